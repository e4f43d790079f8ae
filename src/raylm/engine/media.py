"""Media in a request (images, audio, video, files): checked before anything is fetched, in every shape.

    a media part (chat `image_url`/`video_url`/`audio_url`/`input_audio`, Responses `input_image`/`input_file`,
    Anthropic `image`/`document` with `source.url`, wherever it is nested) for a text-only model   ─► 400
    each of its URLs:  data:                                                                        ok
                       file: (any letter case)   only under engine_args.allowed_local_media_path    else 400
                       http(s)://host/...        only for a host in engine_args.allowed_media_domains else 400
                       anything else                                                                400

Every refusal is the same 400, whatever the URL: no answer tells a client whether a host exists or
answered. Nothing remote is fetched unless the operator listed its domain; redirects are not followed
(VLLM_MEDIA_URL_ALLOW_REDIRECTS=0 in every engine process, hardware.engine_env), so an allowed host cannot
send the fetch elsewhere. A fetch from an allowed host that fails is answered with one message too (vllm.py).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from raylm import errors

MEDIA_WORDS = ("image", "audio", "video", "file", "document")
URL_KEYS = frozenset({"url", "image_url", "video_url", "audio_url", "file_url"})
MEDIA_REFUSED = ("this media URL is not accepted: data: URLs are, and http(s) URLs only on the model's "
                 "allowed_media_domains, files only under its allowed_local_media_path")
MEDIA_FAILED = "a media URL of this request could not be loaded"


def media_parts(body: dict) -> list[dict]:
    """Every typed part, at any depth of `messages` or `input`, whose type names a medium."""
    found, stack = [], [body.get("messages"), body.get("input")]
    while stack:  # a loop, not recursion: bodies may be nested deeply
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, dict):
            kind = value.get("type")
            if isinstance(kind, str) and any(word in kind for word in MEDIA_WORDS):
                found.append(value)
            else:
                stack.extend(value.values())
    return found


def urls(part: dict) -> list[str]:
    """The URLs a media part names: under a URL key (as a string, or an object's `url`), at any depth."""
    found, stack = [], [part]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if key in URL_KEYS and isinstance(item, str):
                    found.append(item)
                else:
                    stack.append(item)
        elif isinstance(value, list):
            stack.extend(value)
    return found


def check(body: dict, model: str, multimodal: bool, allowed_domains: list[str] | None,
          local_folder: str | None) -> bool:
    """Raise the uniform 400 for media this model may not take; True when a URL will be fetched."""
    parts = media_parts(body)
    if parts and not multimodal:
        kind = str(parts[0].get("type"))[:32]
        raise errors.InvalidRequestError(f"model {model!r} takes text only, not {kind!r} parts", param="messages",
                                         code="unsupported_content")
    remote = False
    domains = {d.lower() for d in allowed_domains or ()}
    for url in (u for part in parts for u in urls(part)):
        scheme = url.split(":", 1)[0].strip().lower() if ":" in url else ""
        if scheme == "data" or (scheme == "file" and local_folder):
            continue
        try:
            host = urlsplit(url.strip()).hostname if scheme in ("http", "https") else None
        except ValueError:  # a malformed authority
            host = None
        if host is None or host.lower() not in domains:
            raise errors.InvalidRequestError(MEDIA_REFUSED, param="messages", code="media_url_not_allowed")
        remote = True
    return remote

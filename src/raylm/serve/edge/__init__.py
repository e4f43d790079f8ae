"""The request path at the front, in the ingress replicas on the head node: the HTTP server and the limits
it enforces before anything else runs (http.py), API keys and tenants (access.py), the OpenAI routes and the
ingress deployment that forwards each request to a model replica, retries it and relays its stream
(ingress.py, routes.py), the prefix-aware router Serve runs in this process (routing.py), and the
browser playground (playground/)."""

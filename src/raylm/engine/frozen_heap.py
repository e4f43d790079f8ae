"""Imported last by the forkserver a replica starts (engine/vllm.py FORKSERVER_PRELOAD): what it imported
leaves the garbage collector's reach (_ray.freeze_heap), there and in every EngineCore forked from it.

vLLM collects in full three times while its EngineCore starts (after the weights load, after they are
processed, and before it freezes its own heap: vllm.utils.gc_utils.freeze_gc_heap). Each walked the heap the
child inherited, torch and vLLM imported: ~0.6 s apiece on the 2-core test machine, ~1.7 s of a 7.6 s engine
start. Frozen here, they walk only what the child made. It also spares the child the writes a collection
makes to every object it visits (copy-on-write pages)."""

from __future__ import annotations

from raylm._ray import freeze_heap

freeze_heap()

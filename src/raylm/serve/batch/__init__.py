"""The OpenAI Batch API: its routes on the ingress (api.py), files and batches on disk scoped to a tenant
(store.py), and the deployment that runs each batch as a `raylm data` job sending lines to the models as
the lowest class of work (jobs.py)."""

"""The Kubernetes sidecar injector: a mutating admission webhook that adds walcar to pods that ask for it.

settings.py     the injector's own settings (injector.yaml)
annotations.py  per-pod `walcar.io/*` annotations, validated
render.py       the pod's walcar config: control plane + per-pod listeners
container.py    the walcar container, its volumes, the app's env
patch.py        AdmissionReview in -> AdmissionReview (JSONPatch) out, sans I/O
server.py       the HTTPS ASGI app (hypercorn on trio)
cli.py          `walcar inject serve|wait-ready`
"""

"""The Cloud TPU / GKE launcher: ``python launch/tpu.py`` (the command line) and the modules it is made of:
``checks`` (inputs), ``tpu_vm`` (TPU VMs, storage), ``runs`` (train / eval on the workers), ``gke`` (xpk)."""

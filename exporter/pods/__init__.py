"""The pods layer: who a cgroup belongs to. It owns the pod metadata (pods: pod JSON and
workloads), its sources and their health (metadata: the pod store and the pods file; kube:
the Kubernetes API list/watch and its settings), and the resolution of a kernel cgroup id
to a pod's identity (cgroups: kubelet cgroup paths; identity). It imports nothing from the
other layers, so a metadata source can be used and tested without BPF or metric code."""

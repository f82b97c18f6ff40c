"""Cluster layer: the cluster configs (`ray up`, KubeRay, runtime_env) and `ray job submit` to a
multi-node Ray started on this machine by cluster/local_cluster.py."""

"""The moving fleet: what a cluster can scale to, which node type to launch, and
what a node does when its spot instance is about to be reclaimed.

- :mod:`biflow.fleet.capacity`: resources the cluster *can have* (autoscaler
  node types), not only what is up now; ``ray.use_gpu: auto`` decides from it.
- :mod:`biflow.fleet.scorer`: the v1 autoscaler's utilization scorer with spot
  to on-demand fallback after a failed launch.
- :mod:`biflow.fleet.spot_notice`: polls the instance metadata for a spot
  interruption notice and drains the Ray node with the preemption reason.
"""

# Ray Train's controller waits this long for a worker group before a start counts as
# failed (its default is 60 s): GPU nodes that scale up from zero need minutes. The
# controller inherits the job's (or the local driver's) environment; launch.py and
# submit.py set it there, the cluster configs on every node.
START_TIMEOUT_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}

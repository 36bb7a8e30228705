"""A cleaner for the worker groups of stopped trials, on PRIVATE Ray APIs.

Why it exists: when ASHA stops a trial inside ``trainer.fit()``, the trial's
process exits but the placement group of its Ray Train worker group can stay
behind, holding the trial's CPUs/GPUs until the driver exits, so the next
trials never get scheduled. Ray Train's own cleaner finds such groups through
the state API, which needs the dashboard of *this* cluster and reaches the
wrong one when several local Ray instances run on one machine (tests, a
laptop).

What is private (Ray 2.60; may change in any release): ``ray._private.state``
(the GCS accessor and its placement-group table) and the protobuf
``ray.core.generated.gcs_pb2.PlacementGroupTableData`` (fields ``state``,
``is_detached``, ``creator_actor_dead``, ``creator_actor_id``). Any failure
here is swallowed: a broken cleaner may leave CPUs held, never fail a search.
Nothing else in biflow touches private Ray APIs.
"""

from __future__ import annotations

import time

def release_orphaned_placement_groups() -> int:
    """Remove placement groups whose creating actor is dead: the worker groups of
    trainers whose trial ASHA stopped inside ``trainer.fit()``.

    Ray Train's own cleaner does this through the state API, which needs the
    dashboard of *this* cluster and finds the wrong one when several local Ray
    instances run on a machine; unremoved, each leak holds a trial's CPUs/GPUs
    until the driver exits. Placement groups made by the driver (Tune's trial
    bundles) and detached ones are left alone.
    """
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = 0
    try:
        for raw in state._connect_and_get_accessor().get_placement_group_table():
            pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
            if (pg.state != gcs_pb2.PlacementGroupTableData.REMOVED and not pg.is_detached
                    and pg.creator_actor_dead and not ray.ActorID(pg.creator_actor_id).is_nil()):
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
                removed += 1
    except Exception:  # private API: never let the janitor fail a search
        pass
    return removed


def janitor():
    from ray import tune

    class PlacementGroupJanitor(tune.Callback):
        """Frees the worker groups of stopped trials (see release_orphaned_placement_groups)."""

        def __init__(self, every_s: float = 2.0):
            self.every_s, self.last = every_s, 0.0

        def on_step_end(self, iteration, trials, **info):
            if time.time() - self.last > self.every_s:
                self.last = time.time()
                if release_orphaned_placement_groups():
                    print("[tune] freed the worker group of a stopped trial", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            release_orphaned_placement_groups()

        def on_experiment_end(self, trials, **info):
            release_orphaned_placement_groups()

    return PlacementGroupJanitor()


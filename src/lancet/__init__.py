"""lancet: whole-step all-to-all/compute overlap for Mixture-of-Experts training.

The public API (``lancet.api``, imported on first use so that ``import lancet`` stays cheap)::

    step = lancet.Step(model, loss_fn, optimizer, group=ep_group)
    profile = lancet.profile(step, batches)
    comm = lancet.profile_comm(ep_group, device)
    plan = lancet.optimize(step, batch, profile, comm)
    runner = lancet.Runner(step, plan)
    loss = runner.step(batch)
"""

__version__ = "0.1.0"

_API = {
    "Step": "lancet.api",
    "Runner": "lancet.api",
    "capture_step": "lancet.api",
    "profile": "lancet.api",
    "profile_comm": "lancet.api",
    "optimize": "lancet.api",
    "ExpertParamError": "lancet.api",
    "Plan": "lancet.plan.plan",
    "CaptureError": "lancet.capture.trace",
    "ModelBundle": "lancet.models.factory",
    "dispatch_region": "lancet.graph.meta",
    "register_axis_rule": "lancet.passes.partition.axes",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'lancet' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_API[name]), name)

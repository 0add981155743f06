"""Trace-driven cluster simulator: the policy core (placement, hotness, dispatch, routing) on
simulated instances. Run ``python -m sglang_tokenlake.sim --help``; see docs/simulator.md."""

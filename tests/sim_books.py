"""Books of the simulator's TokenLake, checked against each other in tests."""

from sglang_tokenlake.sim.tokenlake import TokenLake


def check_books(tl: TokenLake) -> None:
    """The location index is exactly what the caches hold, no cache is over its capacity,
    every located key but a root has its parent entry, and each segment's count of located
    children is the number of those entries."""
    held: dict[int, set[str]] = {}
    for wid, cache in tl.caches.items():
        assert len(cache) <= cache.capacity, wid
        for k in cache.keys():
            held.setdefault(k, set()).add(wid)
    assert held == tl.loc
    counted: dict[int, int] = {}
    for k, p in tl.parent.items():
        assert k in tl.loc
        counted[p] = counted.get(p, 0) + 1
    assert counted == dict(tl.nkids)

"""Pure algorithms over plain data: the cost model, span placement, rebalancing and route selection.
No I/O, no torch, no hivemind."""

"""Pure algorithms over plain data: the cost model, span placement, rebalancing and route selection.
No I/O, no torch, no hivemind.

* :mod:`partitioner.cost`: time and throughput of a peer holding a span (compute, KV-cache memory, network);
* :mod:`partitioner.flow`: the evaluator, the max-flow LP of a placement with optimal routing, and its chains;
* :mod:`partitioner.bound`: an upper bound on any placement's throughput (contiguity relaxation, cover LP);
* :mod:`partitioner.milp`: placement + routing as an exact MILP (small swarms: a bound, placements, rebalancing,
  and the improvement of a heuristic placement started from it);
* :mod:`partitioner.placement`: the span (start and length) of a joining peer, and a placement for a swarm;
* :mod:`partitioner.rebalance`: safe, budgeted rebalancing plans with hysteresis;
* :mod:`partitioner.route`: lowest-latency chains for interactive sessions, flow-proportional routing for the rest;
* :mod:`partitioner.petals`: the Petals baseline (join, rebalancing, routing), for comparison only.
"""

"""Swarms far larger than one machine, simulated with the same :mod:`partitioner` code: random heterogeneous
peers, their placement and routing by our partitioner and by the Petals baseline, churn, and the upper bound."""

"""Local multi-peer swarms (real peer processes on loopback) and simulations of larger swarms.
Nothing in the product imports this package."""

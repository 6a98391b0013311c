"""Cluster: heartbeats, the decision core, generations, VIP, scripts, witness."""

"""`python -m kasmina serve`: the Kasmina runtime service (gRPC job API, HTTP health/metrics)."""

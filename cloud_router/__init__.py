"""The cloud router: watches Consul and forwards each request to the nearest healthy edge."""

"""Prometheus metrics of one server, in a registry of its own."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("spectr_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)
        self.tokens = Counter("spectr_generated_tokens", "Tokens generated", registry=self.registry)
        self.accepted = Counter("spectr_accepted_tokens", "Steps that accepted a draft token at this position",
                                ["position"], registry=self.registry)
        self.block_efficiency = Histogram("spectr_block_efficiency", "Emitted tokens per target pass, per request",
                                          buckets=(1, 1.25, 1.5, 2, 2.5, 3, 4, 6, 9), registry=self.registry)
        self.first_token = Histogram("spectr_time_to_first_token_seconds", "Time to the first token",
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token = Histogram("spectr_inter_token_latency_seconds", "Time between streamed chunks, per token",
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("spectr_batch_sequences", "Generations sharing a target pass (batching)",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=self.registry)
        self.in_flight = Gauge("spectr_requests_in_flight", "Generations admitted (running or queued)",
                               registry=self.registry)

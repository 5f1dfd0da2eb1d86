"""Load generators, plans and reports: `loadtest grpc` (ghz-compatible), `loadtest http` (the
/chat plan), `loadtest sweep` (the write-up's table, the knee, the bottleneck stage, and the
replicated-monolith baseline)."""

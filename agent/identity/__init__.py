"""The VM's cloud identity as the agent's Kubernetes credential: one module per provider
(gcp, azure, aws, oidc_file), what they share (common), and the refresher that keeps a fresh token
where the API client reads it (refresh)."""

"""Webhooks: a job's terminal state POSTed, signed with its tenant's secret, to the job's webhook_url.

addresses  which URLs a webhook may reach (checked at submit and before every POST)
repository the outbox of deliveries and their attempts, the tenants' sealed secrets
sender     the loop (in the reaper) that POSTs due deliveries, with retries and backoff
router     GET /v1/jobs/{id}/webhooks, the tenant's signing secret (read, rotate)
"""

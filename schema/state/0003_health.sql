-- A sandbox's healthcheck status as its supervisor last observed it (docs/health.md):
-- NULL when the spec has no healthcheck, else starting | healthy | unhealthy, and why it is
-- unhealthy. Written by the supervisor on every transition; reset when a new supervisor starts.
ALTER TABLE sandboxes ADD COLUMN health TEXT;
ALTER TABLE sandboxes ADD COLUMN health_detail TEXT;

-- 0005_views.sql — analytical views. Idempotent: CREATE OR REPLACE VIEW (same columns/types).
--
-- FIX (both views): WITH (security_invoker = true) (PostgreSQL 15). A plain view runs with its
-- owner's privileges, and the owner bypasses RLS, so the seed's views showed every tenant's
-- dashboard and task statistics to any authenticated user. With security_invoker the
-- underlying tables' RLS policies apply to the reader.

-- ---------------------------------------------------------------------------------------------
-- workspace_dashboard
-- FIX: the seed LEFT JOINed tasks, orders and products and aggregated once, so every count and
-- sum was multiplied by the row counts of the other two tables (3 tasks x 2 orders x 4
-- products = every task counted 8 times, revenue counted 12 times...). Each table is now
-- aggregated on its own in a LATERAL subquery (one row each, even when empty).
-- FIX: tasks_completed_today used created_at (a task created last week and finished today was
-- not counted; one created today and still running was not either); it now uses completed_at.
-- FIX: "today" is the workspace's local day (workspaces.timezone), not the database session's
-- CURRENT_DATE: day_start = local midnight of (now() AT TIME ZONE w.timezone)::date, as a
-- timestamptz. revenue_30d covers orders since local midnight 30 days ago.
-- FIX: revenue_30d excluded nothing; cancelled and refunded orders are no longer revenue.
-- orders_today still counts every order placed today (it is an activity count).
-- Soft-deleted workspaces (deleted_at IS NOT NULL) are not shown.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE VIEW workspace_dashboard
WITH (security_invoker = true)
AS
SELECT
  w.id AS workspace_id,
  w.name AS workspace_name,
  w.plan,
  w.credits_balance,
  w.credits_used_this_month,

  -- Task metrics
  t.pending_tasks,
  t.processing_tasks,
  t.tasks_completed_today,

  -- Financial metrics
  o.revenue_30d,
  o.orders_today,

  -- Product metrics
  p.total_products,
  p.active_products
FROM workspaces w
CROSS JOIN LATERAL (
  SELECT (((now() AT TIME ZONE w.timezone)::date)::timestamp AT TIME ZONE w.timezone) AS day_start
) d
CROSS JOIN LATERAL (
  SELECT
    count(*) FILTER (WHERE tk.status = 'pending') AS pending_tasks,
    count(*) FILTER (WHERE tk.status = 'processing') AS processing_tasks,
    count(*) FILTER (WHERE tk.status = 'completed' AND tk.completed_at >= d.day_start) AS tasks_completed_today
  FROM tasks tk
  WHERE tk.workspace_id = w.id
) t
CROSS JOIN LATERAL (
  SELECT
    coalesce(sum(od.total_amount) FILTER (
      WHERE od.order_date >= d.day_start - interval '30 days'
        AND od.status NOT IN ('cancelled', 'refunded')), 0) AS revenue_30d,
    count(*) FILTER (WHERE od.order_date >= d.day_start) AS orders_today
  FROM orders od
  WHERE od.workspace_id = w.id
    AND od.order_date >= d.day_start - interval '30 days'
) o
CROSS JOIN LATERAL (
  SELECT
    count(*) AS total_products,
    count(*) FILTER (WHERE pr.status = 'active') AS active_products
  FROM products pr
  WHERE pr.workspace_id = w.id
) p
WHERE w.deleted_at IS NULL;

-- ---------------------------------------------------------------------------------------------
-- task_performance
-- FIX: success_rate divided completed tasks by ALL tasks, including ones still pending, queued
-- or processing, so a busy day looked like a failing one. It is now completed / finished
-- (completed + failed + escalated; cancelled tasks were never attempted to the end), as float8,
-- NULL when nothing finished (no division by zero).
-- FIX: `date` and the 30-day window depended on the database session's TimeZone
-- (DATE_TRUNC('day', timestamptz), CURRENT_DATE); both now use the workspace's timezone.
-- `date` keeps its type (timestamptz, local midnight).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE VIEW task_performance
WITH (security_invoker = true)
AS
SELECT
  tk.workspace_id,
  tk.type AS task_type,
  count(*) AS total_executions,
  avg(tk.processing_time_ms) AS avg_processing_time,
  avg(tk.actual_cost) AS avg_cost,
  avg(tk.quality_score) AS avg_quality_score,
  (count(*) FILTER (WHERE tk.status = 'completed'))::float8
    / nullif(count(*) FILTER (WHERE tk.status IN ('completed', 'failed', 'escalated')), 0) AS success_rate,
  date_trunc('day', tk.created_at, w.timezone) AS date
FROM tasks tk
JOIN workspaces w ON w.id = tk.workspace_id
WHERE tk.created_at >= date_trunc('day', now(), w.timezone) - interval '30 days'
GROUP BY tk.workspace_id, tk.type, date_trunc('day', tk.created_at, w.timezone);

GRANT SELECT ON workspace_dashboard, task_performance TO authenticated, service_role;

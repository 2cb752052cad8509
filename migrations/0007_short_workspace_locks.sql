-- 0007_short_workspace_locks.sql — the billing triggers lock workspace rows themselves, late
-- and in id order, so a batch of completions holds its workspaces for milliseconds instead of
-- for the whole batch.
--
-- Why: every completion charges (deduct_task_credits) and releases a reservation
-- (bizq_release_reservation) on its workspace row, and every claim reserves on it. Until this
-- migration the engine locked the workspace rows of a batch *before* its UPDATE of tasks, to
-- keep one lock order (task rows, then workspace rows by id) between concurrent statements.
-- That held the busiest rows of the database for the whole UPDATE of up to a thousand tasks,
-- and claims queued behind it: sampled under load, backends spent about as long waiting for
-- workspace rows as working.
--
-- Now the first billing trigger of a statement locks, in id order, every workspace whose
-- balance or reservation the statement may change (a superset of what both triggers touch:
-- rows that are now 'completed', and rows that were 'processing' with a reservation), just
-- before it writes them at the end of the statement. The set is read from each transition
-- table alone, never by joining the two: the planner has no statistics on transition tables,
-- and a join it planned as a nested loop made a 5,000-row admit take seconds. Task rows are still locked first (by the
-- UPDATE itself, and in id order by the engine beforehand), so the lock order is unchanged;
-- only the window shrinks. Both functions take the same lock, so the order holds whichever
-- fires first; the second finds the rows already held.
--
-- Semantics of the charge and the release are unchanged (same statements as 0004 and 0006).
-- Idempotent: CREATE OR REPLACE and REVOKE only.

-- Locks the given workspace rows in id order, the engine's lock order. Called by both billing
-- triggers (running as their owner); not for direct use.
CREATE OR REPLACE FUNCTION bizq_lock_workspaces(ids uuid[])
RETURNS void
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
BEGIN
  IF cardinality(ids) > 0 THEN
    PERFORM 1
       FROM workspaces w
      WHERE w.id = ANY (ids)
      ORDER BY w.id
        FOR NO KEY UPDATE;
  END IF;
END;
$$;
REVOKE EXECUTE ON FUNCTION bizq_lock_workspaces(uuid[]) FROM PUBLIC;

CREATE OR REPLACE FUNCTION deduct_task_credits()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
  r            record;
  old_balance  integer;
  new_balance  integer;
  credit_limit integer;
  threshold    numeric;
BEGIN
  -- Every workspace this statement charges or releases, locked in id order (see header).
  PERFORM bizq_lock_workspaces(ARRAY(
    SELECT n.workspace_id FROM completed_new n WHERE n.status = 'completed'
    UNION
    SELECT o.workspace_id FROM completed_old o WHERE o.status = 'processing' AND o.reserved_credits > 0));

  -- One pass per workspace per statement (workspaces in id order, the engine's lock order):
  -- a worker completing 500 tasks of one workspace updates that workspace row once, not 500
  -- times. The statement's completions are charged together, so "once per crossing" holds per
  -- statement too: the balance crosses the threshold at most once in one UPDATE.
  FOR r IN
    SELECT n.workspace_id,
           SUM(GREATEST(COALESCE(n.actual_cost, n.estimated_cost, 0), 0))::integer AS cost,
           (array_agg(n.id ORDER BY COALESCE(n.actual_cost, n.estimated_cost, 0) DESC, n.id))[1] AS task_id
      FROM completed_new n
      JOIN completed_old o ON o.id = n.id
     WHERE n.status = 'completed'
       AND o.status IS DISTINCT FROM 'completed'
     GROUP BY n.workspace_id
    HAVING SUM(GREATEST(COALESCE(n.actual_cost, n.estimated_cost, 0), 0)) > 0
     ORDER BY n.workspace_id
  LOOP
    SELECT credits_balance INTO old_balance
    FROM workspaces WHERE id = r.workspace_id
    FOR NO KEY UPDATE;

    UPDATE workspaces SET
      credits_balance = GREATEST(credits_balance - r.cost, 0),
      credits_used_this_month = credits_used_this_month + r.cost,
      credits_overdrawn = credits_overdrawn + GREATEST(r.cost - credits_balance, 0)
    WHERE id = r.workspace_id
    RETURNING credits_balance, monthly_credit_limit INTO new_balance, credit_limit;

    threshold := credit_limit * 0.10;
    IF old_balance >= threshold AND new_balance < threshold THEN
      INSERT INTO analytics_events (workspace_id, event_type, event_name, source, task_id, properties)
      VALUES (r.workspace_id, 'system', 'low_credits', 'billing', r.task_id,
              jsonb_build_object(
                'credits_remaining', new_balance,
                'threshold', threshold,
                'monthly_credit_limit', credit_limit,
                'task_id', r.task_id,
                'task_cost', r.cost));
    END IF;
  END LOOP;

  RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION bizq_release_reservation()
RETURNS TRIGGER
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
  -- The same lock as deduct_task_credits takes first (see header); a no-op when it already has.
  PERFORM bizq_lock_workspaces(ARRAY(
    SELECT n.workspace_id FROM released_new n WHERE n.status = 'completed'
    UNION
    SELECT o.workspace_id FROM released_old o WHERE o.status = 'processing' AND o.reserved_credits > 0));

  UPDATE workspaces w
     SET credits_reserved = GREATEST(w.credits_reserved - r.released, 0)
    FROM (SELECT o.workspace_id, SUM(o.reserved_credits)::integer AS released
            FROM released_old o
            JOIN released_new n ON n.id = o.id
           WHERE o.status = 'processing'
             AND n.status IS DISTINCT FROM 'processing'
             AND o.reserved_credits > 0
           GROUP BY o.workspace_id) r
   WHERE w.id = r.workspace_id;
  RETURN NULL;
END;
$$;

-- 0001_schema.sql — BizQ core tables.
--
-- Source of truth: the BizQ schema document (bizq-schema.md). Every table, column name, column
-- type, CHECK value and constraint name of that document is kept. Where the document's SQL is
-- defective the fix is marked with a `-- FIX:` comment; docs/schema.md lists them all.
--
-- Idempotent: the whole file can be re-run by hand on an already-migrated database.

-- pgcrypto: gen_random_uuid() is core since PostgreSQL 13, but pgp_sym_encrypt/decrypt (used for
-- stores.credentials, see 0004) come from pgcrypto. On Supabase it already lives in the
-- `extensions` schema; IF NOT EXISTS keeps it there.
CREATE EXTENSION IF NOT EXISTS pgcrypto;

-- FIX: a workspace timezone is used by the dashboard view (`now() AT TIME ZONE w.timezone`); one
-- invalid value would make that view raise for every reader. Validate it on write instead.
CREATE OR REPLACE FUNCTION is_valid_timezone(tz text)
RETURNS boolean
LANGUAGE plpgsql
STABLE
SET search_path = public, pg_temp
AS $$
BEGIN
  IF tz IS NULL OR tz = '' THEN
    RETURN false;
  END IF;
  PERFORM now() AT TIME ZONE tz;
  RETURN true;
EXCEPTION WHEN invalid_parameter_value OR data_exception THEN
  RETURN false;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- 1. workspaces
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS workspaces (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  name TEXT NOT NULL,
  slug TEXT UNIQUE NOT NULL,

  -- Subscription & Billing
  plan TEXT NOT NULL DEFAULT 'starter' CHECK (plan IN ('starter', 'growth', 'scale', 'enterprise')),
  -- FIX: NOT NULL — a NULL status passes the CHECK (NULL IN (...) is NULL, which CHECK accepts)
  -- and means "no status at all" to every `= 'active'` filter.
  subscription_status TEXT NOT NULL DEFAULT 'active' CHECK (subscription_status IN ('active', 'cancelled', 'suspended', 'trial')),
  trial_ends_at TIMESTAMP WITH TIME ZONE,

  -- Credits & Usage
  credits_balance INTEGER NOT NULL DEFAULT 100,
  -- FIX: NOT NULL — `credits_used_this_month + cost` on NULL stays NULL, silently losing usage.
  credits_used_this_month INTEGER NOT NULL DEFAULT 0,
  -- FIX: NOT NULL — the low-credit threshold is 10% of this; NULL would disable the warning.
  monthly_credit_limit INTEGER NOT NULL DEFAULT 1000,
  -- FIX (new column): credits a completed task cost but the balance could not cover. The seed's
  -- deduction made the balance negative, which valid_credits rejects, rolling back the task's
  -- completion. The balance is now clamped at 0 and the uncollected remainder recorded here.
  credits_overdrawn INTEGER NOT NULL DEFAULT 0,

  -- Configuration
  -- FIX: NOT NULL — NULL timezone/currency break the dashboard's local-day computation.
  timezone TEXT NOT NULL DEFAULT 'UTC',
  currency TEXT NOT NULL DEFAULT 'USD',

  -- AI Preferences
  ai_preferences JSONB NOT NULL DEFAULT '{
    "preferred_provider": "auto",
    "quality_tier": "standard",
    "cost_sensitivity": 0.5,
    "max_task_cost": 10.0
  }'::jsonb,

  -- Metadata
  created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
  updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
  deleted_at TIMESTAMP WITH TIME ZONE,

  -- Constraints
  CONSTRAINT valid_credits CHECK (credits_balance >= 0),
  CONSTRAINT valid_monthly_limit CHECK (monthly_credit_limit > 0),
  -- FIX (new): usage and overdraft counters can only grow from 0.
  CONSTRAINT valid_credits_used CHECK (credits_used_this_month >= 0),
  CONSTRAINT valid_credits_overdrawn CHECK (credits_overdrawn >= 0),
  CONSTRAINT valid_timezone CHECK (is_valid_timezone(timezone))
);

-- ---------------------------------------------------------------------------------------------
-- 2. users
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS users (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  workspace_id UUID NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,

  -- Identity
  email TEXT NOT NULL,
  full_name TEXT,
  avatar_url TEXT,

  -- Authentication (Supabase Auth integration). UNIQUE: one auth identity belongs to exactly one
  -- workspace, which is what makes current_user_workspace() unambiguous.
  auth_user_id UUID UNIQUE, -- Links to auth.users

  -- Permissions
  role TEXT NOT NULL DEFAULT 'member' CHECK (role IN ('owner', 'admin', 'member', 'viewer')),
  permissions JSONB NOT NULL DEFAULT '[]'::jsonb,

  -- Preferences
  preferences JSONB NOT NULL DEFAULT '{
    "email_notifications": true,
    "task_notifications": true,
    "theme": "system",
    "language": "en"
  }'::jsonb,

  -- Activity
  last_active_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
  created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
  updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),

  -- Constraints
  UNIQUE(workspace_id, email),
  -- FIX (new): target of the composite foreign keys below, so that a task/content project can
  -- only reference a user of its own workspace (no cross-tenant links).
  CONSTRAINT users_id_workspace_key UNIQUE (id, workspace_id)
);

-- ---------------------------------------------------------------------------------------------
-- 3. tasks
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS tasks (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  workspace_id UUID NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,

  -- Task Definition
  type TEXT NOT NULL, -- 'content.write_blog_post', 'order.process_batch', etc.
  category TEXT NOT NULL, -- 'content', 'ecommerce', 'customer_service', 'analytics'
  name TEXT NOT NULL,
  description TEXT,

  -- Execution
  status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN (
    'pending', 'queued', 'processing', 'completed', 'failed', 'cancelled', 'escalated'
  )),
  -- FIX: NOT NULL — `ORDER BY priority ASC` puts NULLs LAST, so a task inserted with an explicit
  -- NULL priority would silently sink below every priority-10 task (and the CHECK lets NULL in).
  -- FIX: the seed declared the 1..10 range twice (this inline CHECK and valid_priority); only
  -- the named constraint is kept.
  priority INTEGER NOT NULL DEFAULT 5, -- 1=highest, 10=lowest

  -- Input/Output
  input JSONB NOT NULL,
  output JSONB,
  error_details JSONB,

  -- Processing Details
  worker_type TEXT NOT NULL DEFAULT 'ai' CHECK (worker_type IN ('ai', 'human', 'integration', 'webhook')),
  ai_model TEXT, -- 'gpt-4', 'claude-3-opus', etc.
  ai_provider TEXT, -- 'openai', 'anthropic', etc.
  processing_time_ms INTEGER,

  -- Cost & Credits
  estimated_cost INTEGER, -- In credits
  actual_cost INTEGER, -- In credits
  cost_breakdown JSONB, -- Detailed cost info

  -- Relationships
  -- FIX: ON DELETE SET NULL (column) — the seed's plain REFERENCES made deleting a user fail
  -- while they had tasks. Composite keys (x, workspace_id) keep references inside the tenant;
  -- `SET NULL (col)` (PostgreSQL 15) nulls only the reference, never workspace_id.
  created_by UUID,
  assigned_to UUID, -- For human tasks
  parent_task_id UUID, -- For subtasks
  workflow_id UUID, -- For grouped tasks

  -- Dependencies
  -- FIX: NOT NULL — with NULL, `x = ANY(depends_on)` / array_length() return NULL, not false/0.
  depends_on UUID[] NOT NULL DEFAULT '{}', -- Array of task IDs
  blocks UUID[] NOT NULL DEFAULT '{}', -- Array of task IDs this blocks

  -- Scheduling
  scheduled_for TIMESTAMP WITH TIME ZONE,
  started_at TIMESTAMP WITH TIME ZONE,
  completed_at TIMESTAMP WITH TIME ZONE,

  -- Metadata
  created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
  updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),

  -- Context for AI
  context JSONB NOT NULL DEFAULT '{}'::jsonb,
  tags TEXT[] NOT NULL DEFAULT '{}',

  -- Quality & Feedback
  quality_score DECIMAL(3,2), -- 0.00 to 5.00
  user_feedback JSONB,

  -- Constraints
  CONSTRAINT valid_priority CHECK (priority BETWEEN 1 AND 10),
  CONSTRAINT valid_quality_score CHECK (quality_score IS NULL OR (quality_score >= 0 AND quality_score <= 5)),
  -- FIX (new): a negative cost would *credit* the workspace when the task completes.
  CONSTRAINT valid_estimated_cost CHECK (estimated_cost IS NULL OR estimated_cost >= 0),
  CONSTRAINT valid_actual_cost CHECK (actual_cost IS NULL OR actual_cost >= 0),
  CONSTRAINT valid_processing_time CHECK (processing_time_ms IS NULL OR processing_time_ms >= 0),
  CONSTRAINT tasks_id_workspace_key UNIQUE (id, workspace_id),
  CONSTRAINT tasks_created_by_fkey FOREIGN KEY (created_by, workspace_id)
    REFERENCES users (id, workspace_id) ON DELETE SET NULL (created_by),
  CONSTRAINT tasks_assigned_to_fkey FOREIGN KEY (assigned_to, workspace_id)
    REFERENCES users (id, workspace_id) ON DELETE SET NULL (assigned_to),
  CONSTRAINT tasks_parent_task_id_fkey FOREIGN KEY (parent_task_id, workspace_id)
    REFERENCES tasks (id, workspace_id) ON DELETE SET NULL (parent_task_id),
  CONSTRAINT tasks_not_own_parent CHECK (parent_task_id IS NULL OR parent_task_id <> id)
);

-- ---------------------------------------------------------------------------------------------
-- 4. stores
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS stores (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  workspace_id UUID NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,

  -- Store Identity
  name TEXT NOT NULL,
  platform TEXT NOT NULL CHECK (platform IN (
    'shopify', 'woocommerce', 'amazon', 'etsy', 'squarespace', 'bigcommerce'
  )),
  store_url TEXT NOT NULL,

  -- API Connection
  -- FIX: documented as "Encrypted API keys and tokens" but the seed stored plain JSONB. The
  -- column stays JSONB; the encrypt_store_credentials trigger (0004) replaces any plaintext with
  -- a pgp_sym envelope {"enc":"pgp_sym","v":1,"data":"<base64>"} before it is written.
  credentials JSONB NOT NULL,
  api_version TEXT,

  -- Status & Health
  status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'inactive', 'error', 'setup')),
  last_sync_at TIMESTAMP WITH TIME ZONE,
  sync_status TEXT NOT NULL DEFAULT 'pending' CHECK (sync_status IN ('pending', 'syncing', 'success', 'error')),
  sync_error TEXT,

  -- Configuration
  sync_settings JSONB NOT NULL DEFAULT '{
    "auto_sync": true,
    "sync_frequency": "hourly",
    "sync_products": true,
    "sync_orders": true,
    "sync_customers": true
  }'::jsonb,

  -- Metadata
  created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
  updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),

  -- Constraints
  UNIQUE(workspace_id, platform, store_url),
  CONSTRAINT stores_id_workspace_key UNIQUE (id, workspace_id)
);

-- ---------------------------------------------------------------------------------------------
-- 5. products
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS products (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  workspace_id UUID NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
  -- FIX: composite FK below — a product may only belong to a store of its own workspace.
  store_id UUID,

  -- Product Identity
  external_id TEXT, -- Platform-specific ID
  sku TEXT,
  name TEXT NOT NULL,
  description TEXT,
  short_description TEXT,

  -- Pricing
  price DECIMAL(10,2),
  compare_at_price DECIMAL(10,2),
  cost_price DECIMAL(10,2),
  currency TEXT NOT NULL DEFAULT 'USD',

  -- Inventory
  -- FIX: NOT NULL — valid_inventory accepts NULL, which then reads as "unknown" everywhere.
  inventory_quantity INTEGER NOT NULL DEFAULT 0,
  track_inventory BOOLEAN NOT NULL DEFAULT TRUE,

  -- Classification
  product_type TEXT,
  vendor TEXT,
  category TEXT,
  tags TEXT[] NOT NULL DEFAULT '{}',

  -- Status
  -- FIX: NOT NULL — a NULL status is neither active nor inactive for every report.
  status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'inactive', 'draft', 'archived')),
  published_at TIMESTAMP WITH TIME ZONE,

  -- Media
  images JSONB NOT NULL DEFAULT '[]'::jsonb, -- Array of image URLs and metadata
  featured_image TEXT,

  -- SEO
  seo_title TEXT,
  seo_description TEXT,
  handle TEXT, -- URL slug

  -- Variants
  has_variants BOOLEAN NOT NULL DEFAULT FALSE,
  variant_options JSONB, -- Size, Color, etc.

  -- AI Enhancement Status
  ai_description_generated BOOLEAN NOT NULL DEFAULT FALSE,
  ai_images_generated BOOLEAN NOT NULL DEFAULT FALSE,
  ai_seo_optimized BOOLEAN NOT NULL DEFAULT FALSE,
  ai_last_enhanced_at TIMESTAMP WITH TIME ZONE,

  -- Metadata
  platform_data JSONB NOT NULL DEFAULT '{}'::jsonb, -- Platform-specific fields
  created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
  updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
  synced_at TIMESTAMP WITH TIME ZONE,

  -- Constraints
  CONSTRAINT valid_price CHECK (price IS NULL OR price >= 0),
  CONSTRAINT valid_inventory CHECK (inventory_quantity >= 0),
  CONSTRAINT products_id_workspace_key UNIQUE (id, workspace_id),
  CONSTRAINT products_store_id_fkey FOREIGN KEY (store_id, workspace_id)
    REFERENCES stores (id, workspace_id) ON DELETE CASCADE
);

-- ---------------------------------------------------------------------------------------------
-- 6. product_variants
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS product_variants (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  workspace_id UUID NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
  -- FIX: the seed referenced products(id) alone, so a variant could carry a workspace_id that
  -- differs from its product's (and RLS would show it to the wrong tenant). The composite FK
  -- (product_id, workspace_id) -> products(id, workspace_id) makes that impossible.
  product_id UUID NOT NULL,

  -- Variant Identity
  external_id TEXT,
  sku TEXT,
  barcode TEXT,

  -- Options
  option1 TEXT, -- Size, Color, etc.
  option2 TEXT,
  option3 TEXT,

  -- Pricing
  price DECIMAL(10,2),
  compare_at_price DECIMAL(10,2),
  cost_price DECIMAL(10,2),

  -- Inventory
  inventory_quantity INTEGER NOT NULL DEFAULT 0,

  -- Status
  available BOOLEAN NOT NULL DEFAULT TRUE,

  -- Physical
  weight DECIMAL(8,2),
  weight_unit TEXT DEFAULT 'kg',

  -- Media
  image_url TEXT,

  -- Metadata
  created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
  updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),

  -- Constraints
  CONSTRAINT valid_variant_price CHECK (price IS NULL OR price >= 0),
  CONSTRAINT valid_variant_inventory CHECK (inventory_quantity >= 0),
  CONSTRAINT product_variants_product_id_fkey FOREIGN KEY (product_id, workspace_id)
    REFERENCES products (id, workspace_id) ON DELETE CASCADE
);

-- ---------------------------------------------------------------------------------------------
-- 7. customers
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS customers (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  workspace_id UUID NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,

  -- Customer Identity
  email TEXT NOT NULL,
  first_name TEXT,
  last_name TEXT,
  phone TEXT,

  -- Demographics
  date_of_birth DATE,
  gender TEXT,

  -- Address
  addresses JSONB NOT NULL DEFAULT '[]'::jsonb,
  default_address JSONB,

  -- Customer Metrics (maintained by update_customer_metrics, 0004)
  -- FIX: NOT NULL — these are aggregates, 0 when there are no orders, never NULL.
  total_orders INTEGER NOT NULL DEFAULT 0,
  total_spent DECIMAL(10,2) NOT NULL DEFAULT 0,
  average_order_value DECIMAL(10,2) NOT NULL DEFAULT 0,
  lifetime_value DECIMAL(10,2) NOT NULL DEFAULT 0,

  -- Engagement
  first_order_at TIMESTAMP WITH TIME ZONE,
  last_order_at TIMESTAMP WITH TIME ZONE,
  last_active_at TIMESTAMP WITH TIME ZONE,

  -- Status
  status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'inactive', 'blocked')),
  accepts_marketing BOOLEAN NOT NULL DEFAULT FALSE,

  -- Segmentation
  customer_segment TEXT, -- VIP, Regular, New, etc.
  tags TEXT[] NOT NULL DEFAULT '{}',

  -- Support History
  support_tickets INTEGER NOT NULL DEFAULT 0,
  support_satisfaction DECIMAL(3,2), -- Average satisfaction score
  support_notes TEXT,

  -- AI Insights
  ai_insights JSONB NOT NULL DEFAULT '{}'::jsonb,
  customer_persona TEXT,
  predicted_ltv DECIMAL(10,2),
  churn_risk_score DECIMAL(3,2),

  -- Platform Data
  external_customer_ids JSONB NOT NULL DEFAULT '{}'::jsonb, -- Platform-specific IDs

  -- Metadata
  created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
  updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),

  -- Constraints
  CONSTRAINT valid_total_spent CHECK (total_spent >= 0),
  CONSTRAINT valid_lifetime_value CHECK (lifetime_value >= 0),
  CONSTRAINT valid_churn_risk CHECK (churn_risk_score IS NULL OR (churn_risk_score >= 0 AND churn_risk_score <= 1)),
  -- FIX (new): the metrics trigger divides total_spent by total_orders.
  CONSTRAINT valid_total_orders CHECK (total_orders >= 0),
  CONSTRAINT customers_id_workspace_key UNIQUE (id, workspace_id)
);

-- ---------------------------------------------------------------------------------------------
-- 8. orders
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS orders (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  workspace_id UUID NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
  -- FIX: the seed's plain REFERENCES made deleting a store or customer fail while it had orders
  -- (orders are financial history and must survive): ON DELETE SET NULL (col). Composite keys
  -- keep an order's store/customer inside its workspace.
  store_id UUID,
  customer_id UUID,

  -- Order Identity
  external_id TEXT NOT NULL, -- Platform order ID
  order_number TEXT,

  -- Financial
  total_amount DECIMAL(10,2) NOT NULL,
  subtotal_amount DECIMAL(10,2),
  tax_amount DECIMAL(10,2) NOT NULL DEFAULT 0,
  shipping_amount DECIMAL(10,2) NOT NULL DEFAULT 0,
  discount_amount DECIMAL(10,2) NOT NULL DEFAULT 0,
  currency TEXT NOT NULL DEFAULT 'USD',

  -- Status
  status TEXT NOT NULL CHECK (status IN (
    'pending', 'confirmed', 'processing', 'shipped', 'delivered', 'cancelled', 'refunded'
  )),
  fulfillment_status TEXT CHECK (fulfillment_status IN (
    'pending', 'processing', 'shipped', 'delivered', 'cancelled'
  )),
  payment_status TEXT CHECK (payment_status IN (
    'pending', 'paid', 'partially_paid', 'refunded', 'voided'
  )),

  -- Dates
  order_date TIMESTAMP WITH TIME ZONE NOT NULL,
  shipped_date TIMESTAMP WITH TIME ZONE,
  delivered_date TIMESTAMP WITH TIME ZONE,

  -- Shipping
  shipping_address JSONB,
  billing_address JSONB,
  shipping_method TEXT,
  tracking_number TEXT,
  tracking_url TEXT,

  -- Order Details
  line_items JSONB NOT NULL, -- Array of order items
  shipping_lines JSONB NOT NULL DEFAULT '[]'::jsonb,
  tax_lines JSONB NOT NULL DEFAULT '[]'::jsonb,
  discount_codes JSONB NOT NULL DEFAULT '[]'::jsonb,

  -- Customer
  customer_email TEXT,
  customer_phone TEXT,
  customer_notes TEXT,

  -- Processing
  processed_by TEXT, -- 'ai', 'human', 'auto'
  processing_notes TEXT,
  requires_attention BOOLEAN NOT NULL DEFAULT FALSE,

  -- Platform Data
  platform_data JSONB NOT NULL DEFAULT '{}'::jsonb,

  -- Metadata
  created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
  updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
  synced_at TIMESTAMP WITH TIME ZONE,

  -- Constraints
  CONSTRAINT valid_total_amount CHECK (total_amount >= 0),
  CONSTRAINT valid_tax_amount CHECK (tax_amount >= 0),
  CONSTRAINT valid_shipping_amount CHECK (shipping_amount >= 0),
  -- FIX (new): a negative discount would raise the price.
  CONSTRAINT valid_discount_amount CHECK (discount_amount >= 0),
  CONSTRAINT orders_id_workspace_key UNIQUE (id, workspace_id),
  CONSTRAINT orders_store_id_fkey FOREIGN KEY (store_id, workspace_id)
    REFERENCES stores (id, workspace_id) ON DELETE SET NULL (store_id),
  CONSTRAINT orders_customer_id_fkey FOREIGN KEY (customer_id, workspace_id)
    REFERENCES customers (id, workspace_id) ON DELETE SET NULL (customer_id)
);

-- ---------------------------------------------------------------------------------------------
-- 9. content_projects
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS content_projects (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  workspace_id UUID NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,

  -- Project Details
  name TEXT NOT NULL,
  description TEXT,
  content_type TEXT NOT NULL CHECK (content_type IN (
    'blog_post', 'product_description', 'email_campaign', 'social_post',
    'video_script', 'ad_copy', 'newsletter', 'landing_page'
  )),

  -- Status
  status TEXT NOT NULL DEFAULT 'draft' CHECK (status IN (
    'draft', 'in_progress', 'review', 'approved', 'published', 'archived'
  )),

  -- Content
  title TEXT,
  content TEXT,
  excerpt TEXT,
  meta_description TEXT,

  -- SEO
  target_keywords TEXT[] NOT NULL DEFAULT '{}',
  seo_score INTEGER, -- 0-100
  readability_score INTEGER, -- 0-100

  -- Publishing
  publish_date TIMESTAMP WITH TIME ZONE,
  published_urls TEXT[] NOT NULL DEFAULT '{}',

  -- AI Generation
  ai_generated BOOLEAN NOT NULL DEFAULT FALSE,
  ai_model_used TEXT,
  ai_prompt TEXT,
  ai_generation_cost INTEGER, -- In credits

  -- Assets
  featured_image TEXT,
  media_assets JSONB NOT NULL DEFAULT '[]'::jsonb,

  -- Relationships
  -- FIX: ON DELETE SET NULL (col) + same-workspace composite FKs, as for tasks.
  created_by UUID,
  assigned_to UUID,
  related_products UUID[] NOT NULL DEFAULT '{}', -- Array of product IDs

  -- Campaign
  campaign_id UUID,

  -- Analytics
  view_count INTEGER NOT NULL DEFAULT 0,
  engagement_metrics JSONB NOT NULL DEFAULT '{}'::jsonb,

  -- Metadata
  tags TEXT[] NOT NULL DEFAULT '{}',
  created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
  updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),

  -- Constraints
  CONSTRAINT valid_seo_score CHECK (seo_score IS NULL OR (seo_score >= 0 AND seo_score <= 100)),
  -- FIX (new): documented as 0-100 like seo_score but left unchecked in the seed.
  CONSTRAINT valid_readability_score CHECK (readability_score IS NULL OR (readability_score >= 0 AND readability_score <= 100)),
  CONSTRAINT content_projects_created_by_fkey FOREIGN KEY (created_by, workspace_id)
    REFERENCES users (id, workspace_id) ON DELETE SET NULL (created_by),
  CONSTRAINT content_projects_assigned_to_fkey FOREIGN KEY (assigned_to, workspace_id)
    REFERENCES users (id, workspace_id) ON DELETE SET NULL (assigned_to)
);

-- ---------------------------------------------------------------------------------------------
-- 10. analytics_events (partitioned by month on occurred_at)
-- ---------------------------------------------------------------------------------------------
-- FIX: the seed created `analytics_events_y2024m01 PARTITION OF analytics_events` on a table
-- that was never declared PARTITION BY, which fails. The table is now PARTITION BY RANGE
-- (occurred_at). A partitioned table's primary key must contain the partition key, so the PK is
-- (id, occurred_at) (id alone stays unique in practice: gen_random_uuid()). Consequently no
-- other table can hold a foreign key TO analytics_events — nothing needs one. Foreign keys FROM
-- it are fine (PostgreSQL 12+) and use ON DELETE SET NULL (col) so deleting a product, order,
-- task, user or customer never fails and never deletes history.
-- The seed's stale 2024-01 partition is not created; rows outside the monthly partitions land
-- in analytics_events_default, so no insert ever fails.
CREATE TABLE IF NOT EXISTS analytics_events (
  id UUID NOT NULL DEFAULT gen_random_uuid(),
  workspace_id UUID NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,

  -- Event Details
  event_type TEXT NOT NULL, -- 'page_view', 'purchase', 'task_completed', etc.
  event_name TEXT NOT NULL,

  -- Context
  user_id UUID,
  session_id TEXT,
  source TEXT, -- 'dashboard', 'api', 'webhook', etc.

  -- Data
  properties JSONB NOT NULL DEFAULT '{}'::jsonb,
  revenue DECIMAL(10,2),

  -- Related Entities
  product_id UUID,
  customer_id UUID,
  order_id UUID,
  task_id UUID,

  -- Timestamp
  occurred_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),

  -- Metadata
  created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),

  CONSTRAINT analytics_events_pkey PRIMARY KEY (id, occurred_at),
  CONSTRAINT analytics_events_user_id_fkey FOREIGN KEY (user_id, workspace_id)
    REFERENCES users (id, workspace_id) ON DELETE SET NULL (user_id),
  CONSTRAINT analytics_events_product_id_fkey FOREIGN KEY (product_id, workspace_id)
    REFERENCES products (id, workspace_id) ON DELETE SET NULL (product_id),
  CONSTRAINT analytics_events_customer_id_fkey FOREIGN KEY (customer_id, workspace_id)
    REFERENCES customers (id, workspace_id) ON DELETE SET NULL (customer_id),
  CONSTRAINT analytics_events_order_id_fkey FOREIGN KEY (order_id, workspace_id)
    REFERENCES orders (id, workspace_id) ON DELETE SET NULL (order_id),
  CONSTRAINT analytics_events_task_id_fkey FOREIGN KEY (task_id, workspace_id)
    REFERENCES tasks (id, workspace_id) ON DELETE SET NULL (task_id)
) PARTITION BY RANGE (occurred_at);

CREATE TABLE IF NOT EXISTS analytics_events_default PARTITION OF analytics_events DEFAULT;

-- Creates the monthly partitions analytics_events_yYYYYmMM for the current month and the next
-- `months_ahead` months (UTC month boundaries); returns how many it created. Called here at
-- migration time and periodically by the scheduler.
--
-- Safe to call concurrently (a transaction-scoped advisory lock serialises callers, and each
-- re-checks existence after taking it) and when rows of a new month already sit in the default
-- partition: the new month is created as a standalone table, the matching rows are moved out
-- of the default partition, then the table is attached (a plain CREATE ... PARTITION OF would
-- fail with "updated partition constraint for default partition would be violated").
CREATE OR REPLACE FUNCTION ensure_analytics_partitions(months_ahead integer DEFAULT 3)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
  base_month date := date_trunc('month', now() AT TIME ZONE 'UTC')::date;
  lo timestamptz;
  hi timestamptz;
  part_name text;
  created integer := 0;
  r record;
BEGIN
  IF months_ahead IS NULL OR months_ahead < 0 OR months_ahead > 120 THEN
    RAISE EXCEPTION 'ensure_analytics_partitions: months_ahead must be between 0 and 120';
  END IF;

  -- Serialise concurrent callers (key is per database).
  PERFORM pg_advisory_xact_lock(hashtext('bizq.ensure_analytics_partitions'));

  FOR i IN 0..months_ahead LOOP
    lo := ((base_month + make_interval(months => i))::timestamp) AT TIME ZONE 'UTC';
    hi := ((base_month + make_interval(months => i + 1))::timestamp) AT TIME ZONE 'UTC';
    part_name := format('analytics_events_y%sm%s',
                        to_char(lo AT TIME ZONE 'UTC', 'YYYY'),
                        to_char(lo AT TIME ZONE 'UTC', 'MM'));

    CONTINUE WHEN to_regclass(format('public.%I', part_name)) IS NOT NULL;

    -- Block writers to the parent's default partition while rows move; parent first, then the
    -- default partition (the order inserts take them in), so no deadlock with inserters.
    LOCK TABLE analytics_events IN SHARE UPDATE EXCLUSIVE MODE;
    LOCK TABLE analytics_events_default IN ACCESS EXCLUSIVE MODE;

    EXECUTE format('CREATE TABLE %I (LIKE analytics_events INCLUDING DEFAULTS)', part_name);
    -- Pre-validated range constraint lets ATTACH skip its full scan of the new table.
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (occurred_at >= %L AND occurred_at < %L)',
                   part_name, part_name || '_range', lo, hi);
    EXECUTE format('INSERT INTO %I SELECT * FROM analytics_events_default
                     WHERE occurred_at >= %L AND occurred_at < %L', part_name, lo, hi);
    EXECUTE format('DELETE FROM analytics_events_default WHERE occurred_at >= %L AND occurred_at < %L',
                   lo, hi);
    EXECUTE format('ALTER TABLE analytics_events ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   part_name, lo, hi);
    EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', part_name, part_name || '_range');

    -- A partition is a table of its own: reading it directly bypasses the parent's RLS
    -- policies. Enable RLS on it (no policies = no rows for RLS-subject roles) and drop any
    -- privileges that default privileges (e.g. Supabase's) may have granted.
    EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', part_name);
    EXECUTE format('REVOKE ALL ON TABLE %I FROM PUBLIC', part_name);
    FOR r IN SELECT rolname FROM pg_roles WHERE rolname IN ('anon', 'authenticated') LOOP
      EXECUTE format('REVOKE ALL ON TABLE %I FROM %I', part_name, r.rolname);
    END LOOP;

    created := created + 1;
  END LOOP;

  RETURN created;
END;
$$;

ALTER TABLE analytics_events_default ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON TABLE analytics_events_default FROM PUBLIC;

-- Current month + the next 2 months.
SELECT ensure_analytics_partitions(2);

-- 0003_indexes.sql — indexes from the schema document plus the "Performance Considerations"
-- section. Plain CREATE INDEX (sqlx runs each migration in a transaction, where CONCURRENTLY is
-- not allowed). Idempotent via IF NOT EXISTS.
--
-- FIX: two seed indexes exactly duplicated the index PostgreSQL already builds for a UNIQUE
-- constraint (double write cost, no benefit) and are not created:
--   idx_workspaces_slug      == workspaces_slug_key (UNIQUE slug)
--   idx_users_auth_user_id   == users_auth_user_id_key (UNIQUE auth_user_id)

-- workspaces
CREATE INDEX IF NOT EXISTS idx_workspaces_plan ON workspaces(plan);
CREATE INDEX IF NOT EXISTS idx_workspaces_subscription_status ON workspaces(subscription_status);

-- users
CREATE INDEX IF NOT EXISTS idx_users_workspace_id ON users(workspace_id);
CREATE INDEX IF NOT EXISTS idx_users_email ON users(email);
CREATE INDEX IF NOT EXISTS idx_users_role ON users(role);

-- tasks
CREATE INDEX IF NOT EXISTS idx_tasks_workspace_id ON tasks(workspace_id);
CREATE INDEX IF NOT EXISTS idx_tasks_status ON tasks(status);
CREATE INDEX IF NOT EXISTS idx_tasks_type ON tasks(type);
CREATE INDEX IF NOT EXISTS idx_tasks_category ON tasks(category);
CREATE INDEX IF NOT EXISTS idx_tasks_created_by ON tasks(created_by);
-- FK support: ON DELETE SET NULL from users must find referencing rows without a seq scan.
CREATE INDEX IF NOT EXISTS idx_tasks_assigned_to ON tasks(assigned_to);
CREATE INDEX IF NOT EXISTS idx_tasks_scheduled_for ON tasks(scheduled_for);
CREATE INDEX IF NOT EXISTS idx_tasks_parent_task_id ON tasks(parent_task_id);
CREATE INDEX IF NOT EXISTS idx_tasks_workflow_id ON tasks(workflow_id);
CREATE INDEX IF NOT EXISTS idx_tasks_priority_status ON tasks(priority, status);
CREATE INDEX IF NOT EXISTS idx_tasks_created_at ON tasks(created_at);
-- Performance Considerations: (workspace_id, status) composites.
CREATE INDEX IF NOT EXISTS idx_tasks_workspace_status ON tasks(workspace_id, status);
-- FIX: the document's idx_tasks_pending ON tasks(created_at) WHERE status = 'pending' does not
-- serve the query it is meant for (`WHERE workspace_id = $1 AND status = 'pending' ORDER BY
-- priority, created_at`); the columns now match that query.
CREATE INDEX IF NOT EXISTS idx_tasks_pending ON tasks(workspace_id, priority, created_at) WHERE status = 'pending';
-- Dashboard: completed tasks per workspace by completion time.
CREATE INDEX IF NOT EXISTS idx_tasks_workspace_completed_at ON tasks(workspace_id, completed_at) WHERE status = 'completed';

-- GIN indexes for JSONB columns
CREATE INDEX IF NOT EXISTS idx_tasks_input_gin ON tasks USING GIN(input);
CREATE INDEX IF NOT EXISTS idx_tasks_output_gin ON tasks USING GIN(output);
CREATE INDEX IF NOT EXISTS idx_tasks_context_gin ON tasks USING GIN(context);

-- stores
CREATE INDEX IF NOT EXISTS idx_stores_workspace_id ON stores(workspace_id);
CREATE INDEX IF NOT EXISTS idx_stores_platform ON stores(platform);
CREATE INDEX IF NOT EXISTS idx_stores_status ON stores(status);
CREATE INDEX IF NOT EXISTS idx_stores_last_sync_at ON stores(last_sync_at);

-- products
CREATE INDEX IF NOT EXISTS idx_products_workspace_id ON products(workspace_id);
CREATE INDEX IF NOT EXISTS idx_products_store_id ON products(store_id);
CREATE INDEX IF NOT EXISTS idx_products_external_id ON products(external_id);
CREATE INDEX IF NOT EXISTS idx_products_sku ON products(sku);
CREATE INDEX IF NOT EXISTS idx_products_status ON products(status);
CREATE INDEX IF NOT EXISTS idx_products_product_type ON products(product_type);
CREATE INDEX IF NOT EXISTS idx_products_tags_gin ON products USING GIN(tags);
CREATE INDEX IF NOT EXISTS idx_products_ai_enhanced ON products(ai_description_generated, ai_images_generated);
CREATE INDEX IF NOT EXISTS idx_products_workspace_status ON products(workspace_id, status);

-- product_variants
CREATE INDEX IF NOT EXISTS idx_product_variants_workspace_id ON product_variants(workspace_id);
CREATE INDEX IF NOT EXISTS idx_product_variants_product_id ON product_variants(product_id);
CREATE INDEX IF NOT EXISTS idx_product_variants_sku ON product_variants(sku);

-- customers
CREATE INDEX IF NOT EXISTS idx_customers_workspace_id ON customers(workspace_id);
CREATE INDEX IF NOT EXISTS idx_customers_email ON customers(email);
CREATE INDEX IF NOT EXISTS idx_customers_status ON customers(status);
CREATE INDEX IF NOT EXISTS idx_customers_customer_segment ON customers(customer_segment);
CREATE INDEX IF NOT EXISTS idx_customers_total_spent ON customers(total_spent);
CREATE INDEX IF NOT EXISTS idx_customers_last_order_at ON customers(last_order_at);
CREATE INDEX IF NOT EXISTS idx_customers_tags_gin ON customers USING GIN(tags);
CREATE INDEX IF NOT EXISTS idx_customers_workspace_status ON customers(workspace_id, status);

-- orders
CREATE INDEX IF NOT EXISTS idx_orders_workspace_id ON orders(workspace_id);
CREATE INDEX IF NOT EXISTS idx_orders_store_id ON orders(store_id);
CREATE INDEX IF NOT EXISTS idx_orders_customer_id ON orders(customer_id);
CREATE INDEX IF NOT EXISTS idx_orders_external_id ON orders(external_id);
CREATE INDEX IF NOT EXISTS idx_orders_status ON orders(status);
CREATE INDEX IF NOT EXISTS idx_orders_order_date ON orders(order_date);
CREATE INDEX IF NOT EXISTS idx_orders_requires_attention ON orders(requires_attention);
CREATE INDEX IF NOT EXISTS idx_orders_workspace_status_date ON orders(workspace_id, status, order_date);
-- Dashboard revenue/orders-today scan: by workspace and date regardless of status.
CREATE INDEX IF NOT EXISTS idx_orders_workspace_order_date ON orders(workspace_id, order_date);

-- content_projects
CREATE INDEX IF NOT EXISTS idx_content_projects_workspace_id ON content_projects(workspace_id);
CREATE INDEX IF NOT EXISTS idx_content_projects_content_type ON content_projects(content_type);
CREATE INDEX IF NOT EXISTS idx_content_projects_status ON content_projects(status);
CREATE INDEX IF NOT EXISTS idx_content_projects_created_by ON content_projects(created_by);
CREATE INDEX IF NOT EXISTS idx_content_projects_assigned_to ON content_projects(assigned_to);
CREATE INDEX IF NOT EXISTS idx_content_projects_publish_date ON content_projects(publish_date);
CREATE INDEX IF NOT EXISTS idx_content_projects_tags_gin ON content_projects USING GIN(tags);
CREATE INDEX IF NOT EXISTS idx_content_projects_workspace_status ON content_projects(workspace_id, status);

-- analytics_events (created on the partitioned parent: PostgreSQL builds them on every
-- partition, including ones attached later by ensure_analytics_partitions)
CREATE INDEX IF NOT EXISTS idx_analytics_events_workspace_id ON analytics_events(workspace_id);
CREATE INDEX IF NOT EXISTS idx_analytics_events_event_type ON analytics_events(event_type);
CREATE INDEX IF NOT EXISTS idx_analytics_events_occurred_at ON analytics_events(occurred_at);
CREATE INDEX IF NOT EXISTS idx_analytics_events_user_id ON analytics_events(user_id);
CREATE INDEX IF NOT EXISTS idx_analytics_events_properties_gin ON analytics_events USING GIN(properties);
CREATE INDEX IF NOT EXISTS idx_analytics_events_workspace_occurred_at ON analytics_events(workspace_id, occurred_at);
-- FK support for ON DELETE SET NULL from products/customers/orders/tasks.
CREATE INDEX IF NOT EXISTS idx_analytics_events_product_id ON analytics_events(product_id);
CREATE INDEX IF NOT EXISTS idx_analytics_events_customer_id ON analytics_events(customer_id);
CREATE INDEX IF NOT EXISTS idx_analytics_events_order_id ON analytics_events(order_id);
CREATE INDEX IF NOT EXISTS idx_analytics_events_task_id ON analytics_events(task_id);

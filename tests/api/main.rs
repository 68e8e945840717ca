//! One integration-test binary (fast to link): a module per area of the API.

#[macro_use]
mod helpers;
mod hrana;
mod hrana_selftest;

mod admin;
mod admin_ui;
mod bad_input;
mod concurrency;
mod disk_full;
mod draw;
mod durability;
mod exact;
mod fast_commit;
mod go_database;
mod health;
mod health_states;
mod import_rekey;
mod observe;
mod openapi;
mod operate;
mod plan_limits;
mod process;
mod proxy;
mod regbot;
mod remote;
mod replicas;
mod replicas_sync;
mod usage_query;

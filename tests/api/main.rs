//! One integration-test binary (fast to link): a module per area of the API.

mod helpers;

mod health;
mod admin;
mod draw;
mod concurrency;
mod durability;

//! One integration-test binary (fast to link): a module per area of the API.

#[macro_use]
mod helpers;
mod hrana;
mod hrana_selftest;

mod health;
mod admin;
mod draw;
mod concurrency;
mod durability;
mod process;

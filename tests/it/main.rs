//! The black-box suites, one module each, linked into ONE test binary: each separate
//! `tests/*.rs` file would be its own ~180 MB executable holding a full copy of the
//! crate, which cost gigabytes of disk and minutes of linking per build on a 2-core CI
//! machine. Run one suite with `cargo test --test it auth::`.

// The Stripe-shaped objects in `stripe_real` are deeper than the default budget of `json!`.
#![recursion_limit = "256"]

mod common;

mod architecture;
mod auth;
mod billing;
mod cli;
mod foundation;
mod jobs;
mod oauth;
mod openapi;
mod ops;
mod problem_codes;
mod sec_a;
mod sec_b;
mod sec_c;
mod sec_d;
mod sec_e;
mod stripe_real;

//! Delivery: the scheduler and its one worker pool, traffic control per rate-limit key, the
//! HTTP client plugins send through, and which addresses that client may reach.

pub mod egress;
pub mod scheduler;
pub mod sender;
pub mod traffic;

//! Delivery: the scheduler and its one worker pool, traffic control per rate-limit key, the
//! HTTP client plugins send through, which addresses that client may reach, and the replay
//! selector that feeds archived events to a destination's replay lane.

mod background;
pub mod egress;
pub mod lane;
pub mod pace;
pub mod replay;
mod runs;
pub mod scheduler;
pub mod sender;
pub mod traffic;

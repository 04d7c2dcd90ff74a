//! ReNeg training: the global negative embedding learned by reward feedback
//! ([`global::train`]), and per-prompt adaptation at test time ([`per_sample::adapt`]).

pub mod checkpoint;
pub mod config;
pub mod distributed;
pub mod global;
pub mod memory;
pub mod optim;
pub mod per_sample;
pub mod plot;
pub mod step;

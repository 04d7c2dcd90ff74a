//! reneg: learn, apply and evaluate negative embeddings for Stable Diffusion under the
//! guidance of human-preference reward models (Li et al., "ReNeg", arXiv 2412.19637).
//!
//! Layout: [`tokenizer`] and [`models`] mirror transformers/diffusers module for module;
//! [`nn`] holds the differentiable building blocks (no fused ops without a backward);
//! [`scheduler`] holds the samplers; [`family`] builds each model family's roles (prompt encoder,
//! denoiser, decoder) from its owners' files; [`pipeline`] ties them into guided sampling and the
//! gradient step, written once for every family.

pub mod chart;
pub mod conditioning;
pub mod control;
pub mod embedding;
pub mod error;
pub mod eval;
pub mod family;
pub mod guidance;
pub mod io;
pub mod lora;
pub mod model_file;
pub mod models;
pub mod nn;
pub mod pipeline;
pub mod precision;
pub mod prompt_syntax;
pub mod prompts;
pub mod reward;
pub mod rng;
pub mod run;
pub mod runtime;
pub mod scheduler;
pub mod single_file;
pub mod source;
pub mod t5_tokenizer;
pub mod tokenizer;
pub mod torch_file;
pub mod train;
pub mod video;
pub mod weights;

pub use error::{Error, Result};
pub use pipeline::Pipeline;

//! A model checkpoint as its owners ship it: a safetensors file, or a `torch.save` zip read by
//! the safe reader ([`crate::torch_file`]: tensors only, never code), mapped rather than read
//! into memory. A Lightning checkpoint's weights are its `state_dict`; a DeepSpeed one's are
//! under `module` with each key's `_forward_module.` dropped (lvdm's `load_model_checkpoint`
//! tries that first); a plain state dict is taken whole.

use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Where a nested checkpoint keeps its weights, tried in order: (prefix of the flattened
/// names, prefix dropped after it).
const NESTS: [(&str, &str); 2] = [("module.", "_forward_module."), ("state_dict.", "")];

/// The weights of `names` (a checkpoint's flattened tensor names): their indices and the
/// names they go by once the nesting is dropped.
pub fn select_weights(names: &[String]) -> Vec<(usize, String)> {
    for (nest, inner) in NESTS {
        if names.iter().any(|n| n.starts_with(nest)) {
            return names
                .iter()
                .enumerate()
                .filter_map(|(i, n)| {
                    let rest = n.strip_prefix(nest)?;
                    Some((i, rest.strip_prefix(inner).unwrap_or(rest).to_string()))
                })
                .collect();
        }
    }
    names.iter().cloned().enumerate().collect()
}

/// Reads every weight of the checkpoint at `path` (a PyTorch file's f16 and bf16 as stored,
/// its other floats as f32; a safetensors file's own dtypes), on the CPU.
pub fn read(path: &Path) -> Result<HashMap<String, Tensor>> {
    let file =
        std::fs::File::open(path).map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
    // SAFETY: the map is read-only and lives only while the tensors are copied out of it; a
    // file changed underneath would give wrong values, not unsoundness in our code's logic.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    if crate::torch_file::is_zip(&map) {
        return crate::torch_file::read_state_dict_selected(&map, path, select_weights);
    }
    // A bare pickle (protocol 2-5 opcode first) is torch.save's legacy format; a safetensors
    // header length may start with the same byte, so that is told only when it is not one.
    let legacy = map.len() > 1 && map[0] == 0x80 && (2..=5).contains(&map[1]);
    drop(map);
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
        let what = if legacy {
            "a PyTorch file in the legacy (pre-1.6, non-zip) format; re-save it with a current torch.save, or convert it to .safetensors".to_string()
        } else {
            format!("neither a safetensors file nor a PyTorch (torch.save) checkpoint ({e})")
        };
        Error::file(path, what)
    })
}

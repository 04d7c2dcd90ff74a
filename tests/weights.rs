//! The mapped, read-on-demand checkpoint reader (`reneg::weights`): every stored dtype reads back
//! as candle's whole-file reader converts it, a tensor read twice (its pages released in
//! between) is the same, names list every tensor, and a changed tensor (a LoRA merge) overrides
//! the file's.

use candle_core::{DType, Device, Tensor};
use reneg::weights::Weights;
use std::collections::HashMap;

fn tensor(seed: u64, shape: &[usize]) -> Tensor {
    reneg::rng::randn(seed, shape, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn mapped_tensors_read_as_the_whole_file_reader_converts_them() {
    let dir = std::env::temp_dir().join(format!("reneg-weights-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("w.safetensors");
    let stored: HashMap<String, Tensor> = [
        ("a.f32", tensor(1, &[3, 5]), DType::F32),
        ("b.f16", tensor(2, &[4096]), DType::F16),
        ("c.bf16", tensor(3, &[2, 3, 4]), DType::BF16),
        ("d.f64", tensor(4, &[7]), DType::F64),
    ]
    .into_iter()
    .map(|(n, t, d)| (n.to_string(), t.to_dtype(d).unwrap()))
    .collect();
    candle_core::safetensors::save(&stored, &path).unwrap();
    let eager = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();

    for dtype in [DType::F32, DType::F64, DType::F16] {
        let w = Weights::load(&path, dtype, &Device::Cpu).unwrap();
        let mut names: Vec<&String> = w.names().collect();
        names.sort();
        assert_eq!(names, ["a.f32", "b.f16", "c.bf16", "d.f64"]);
        for (name, t) in &eager {
            let want = t.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap();
            for _ in 0..2 {
                let got = w.get(name, t.dims()).unwrap();
                assert_eq!(got.dtype(), dtype);
                let diff = (got.to_dtype(DType::F64).unwrap() - &want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert_eq!(diff, 0.0, "{name} as {dtype:?}");
            }
        }
        // A wrong shape is refused by name, before anything is read.
        let err = w.get("b.f16", &[64, 64]).unwrap_err().to_string();
        assert!(err.contains("b.f16") && err.contains("[4096]"), "{err}");
        assert!(w
            .get("nope", &[1])
            .unwrap_err()
            .to_string()
            .contains("nope"));
    }

    // A tensor set after load (a merged LoRA) overrides the file's; the rest still come from it.
    let mut w = Weights::load(&path, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(w.stored_tensor("b.f16").unwrap().dtype(), DType::F16);
    w.set_tensor(
        "a.f32".into(),
        Tensor::ones((3, 5), DType::F32, &Device::Cpu).unwrap(),
    );
    let a = w.get("a.f32", &[3, 5]).unwrap().to_vec2::<f32>().unwrap();
    assert!(a.iter().flatten().all(|&v| v == 1.0));
    assert_eq!(w.names().count(), 4);

    // A truncated file is refused at load, naming it.
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let err = Weights::load(&cut, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("cut.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Fine-tuning starts from the file: each tensor a model asks for becomes a `Var` holding the
/// stored values (F16 in the file, F32 to train), listed once however often it is asked for;
/// a tensor the file lacks is an error naming it, not a fresh random layer; the file's other
/// tensors (a CLIP's vision tower, when only its text tower trains) are left out of the vars.
#[test]
fn weights_made_trainable_start_from_the_stored_tensors() {
    let dir = std::env::temp_dir().join(format!("reneg-weights-tune-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("w.safetensors");
    let a = tensor(11, &[4, 3]).to_dtype(DType::F16).unwrap();
    let stored: HashMap<String, Tensor> = [("text.a", a.clone()), ("vision.b", tensor(12, &[5]))]
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
    candle_core::safetensors::save(&stored, &path).unwrap();
    let w = Weights::load(&path, DType::F32, &Device::Cpu)
        .unwrap()
        .into_trainable();
    let got = w.get("text.a", &[4, 3]).unwrap();
    let again = w.get("text.a", &[4, 3]).unwrap();
    let want = a.to_dtype(DType::F32).unwrap();
    let diff = |x: &Tensor| {
        (x - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert_eq!(diff(&got), 0.0);
    assert_eq!(diff(&again), 0.0);
    let vars = w.vars();
    assert_eq!(vars.len(), 1, "one var per tensor asked for");
    assert_eq!(vars[0].0, "text.a");
    assert_eq!(diff(vars[0].1.as_tensor()), 0.0);
    // The var is what the model computes with: a step on it is seen by the next `get`.
    vars[0].1.set(&(want.clone() + 1.0).unwrap()).unwrap();
    let stepped = w.get("text.a", &[4, 3]).unwrap();
    assert_eq!(diff(&(stepped - 1.0).unwrap()), 0.0);
    let err = w.get("text.missing", &[2]).unwrap_err().to_string();
    assert!(err.contains("text.missing"), "{err}");
    assert!(!w.contains("text.missing"));
    assert!(
        w.get("text.a", &[3, 4]).is_err(),
        "a wrong shape is refused"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

//! Negative-embedding files: the official ReNeg `.bin`s, PyTorch files made by torch 2.15
//! (`tools/gen_embedding_fixtures.py`), safe refusal of anything that is not a plain tensor,
//! and exact round trips through our safetensors and PyTorch writers.

mod common;

use common::max_abs_diff;

use candle_core::{DType, Device, Tensor};
use reneg::embedding::NegativeEmbedding;
use std::path::{Path, PathBuf};

const FIX: &str = "tests/fixtures/embedding";

/// An official file from the workspace's shared data (beside the checkout, also in CI). A
/// missing file fails the test, saying where it belongs and where it comes from.
fn official(name: &str) -> PathBuf {
    let p = Path::new("../shared/data/reneg-official").join(name);
    assert!(
        p.is_file(),
        "{} is missing: these tests need the official ReNeg embeddings in ../shared/data/reneg-official/ \
         beside the checkout (the authors' released sd1.4, sd1.5, sd2.1 and pixart-alpha \
         _reneg_emb.bin files; shared/docs/RENEG.md)",
        p.display()
    );
    p
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("reneg-emb-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn official_sd15_file_has_the_published_statistics() {
    let path = official("sd1.5_reneg_emb.bin");
    let emb = NegativeEmbedding::load(&path).unwrap();
    let s = emb.stats().unwrap();
    // Values computed independently with PyTorch (see the issue and official_stats.json).
    assert_eq!(s.shape, vec![1, 77, 768]);
    assert!((s.mean - -0.105774).abs() < 5e-7, "{}", s.mean);
    assert!((s.std - 1.009601).abs() < 5e-7, "{}", s.std);
    assert!((s.row0_norm - 40.4516).abs() < 5e-5, "{}", s.row0_norm);
    assert!(s.fits.contains("768"));
}

#[test]
fn official_files_match_torch_statistics() {
    let stats: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{FIX}/official_stats.json")).unwrap(),
    )
    .unwrap();
    for name in [
        "sd1.4_reneg_emb.bin",
        "sd1.5_reneg_emb.bin",
        "sd2.1_reneg_emb.bin",
        "pixart-alpha_reneg_emb.bin",
    ] {
        let path = official(name);
        let want = &stats[name];
        let s = NegativeEmbedding::load(&path).unwrap().stats().unwrap();
        let shape: Vec<usize> = serde_json::from_value(want["shape"].clone()).unwrap();
        assert_eq!(s.shape, shape, "{name}");
        let close = |a: f64, key: &str| {
            let b = want[key].as_f64().unwrap();
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1e-2),
                "{name} {key}: {a} vs {b}"
            );
        };
        close(s.mean, "mean_f64");
        close(s.std, "std_f64");
        close(s.row0_norm, "row0_norm");
        close(s.row_norm_max, "row_norm_max");
    }
}

#[test]
fn torch_saved_files_equal_their_safetensors_twins() {
    let want =
        candle_core::safetensors::load(format!("{FIX}/torch_saved.safetensors"), &Device::Cpu)
            .unwrap()
            .remove("emb")
            .unwrap();
    let f32 = NegativeEmbedding::load(Path::new(&format!("{FIX}/torch_saved.pt"))).unwrap();
    assert_eq!(f32.tensor.dims(), want.dims());
    assert_eq!(
        max_abs_diff(&f32.tensor, &want),
        0.0,
        "f32 file reads exactly"
    );
    let f16 = NegativeEmbedding::load(Path::new(&format!("{FIX}/torch_saved_f16.pt"))).unwrap();
    assert_eq!(f16.stored_dtype, DType::F16);
    let rounded = want
        .to_dtype(DType::F16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    assert_eq!(
        max_abs_diff(&f16.tensor, &rounded),
        0.0,
        "f16 file reads exactly"
    );
}

#[test]
fn export_round_trips_exactly_in_both_formats() {
    let src = NegativeEmbedding::load(Path::new(&format!("{FIX}/torch_saved.pt"))).unwrap();
    let mut emb = src.clone();
    emb.metadata.insert("base_model".into(), "tiny".into());
    emb.metadata.insert("reward".into(), "hps".into());
    let st = tmp("rt.safetensors");
    emb.save(&st).unwrap();
    let back = NegativeEmbedding::load(&st).unwrap();
    assert_eq!(max_abs_diff(&back.tensor, &src.tensor), 0.0);
    assert_eq!(back.metadata.get("reward").map(String::as_str), Some("hps"));
    let pt = tmp("rt.bin");
    emb.save(&pt).unwrap();
    let bytes = std::fs::read(&pt).unwrap();
    assert!(
        bytes.starts_with(b"PK\x03\x04"),
        "torch.save's zip container"
    );
    let back = NegativeEmbedding::load(&pt).unwrap();
    assert_eq!(max_abs_diff(&back.tensor, &src.tensor), 0.0);
    // The official file survives import -> export -> read, bit for bit.
    let o = NegativeEmbedding::load(&official("sd2.1_reneg_emb.bin")).unwrap();
    let out = tmp("sd21.pt");
    o.save(&out).unwrap();
    assert_eq!(
        max_abs_diff(&NegativeEmbedding::load(&out).unwrap().tensor, &o.tensor),
        0.0
    );
}

#[test]
fn code_and_non_tensor_payloads_are_refused() {
    let _ = std::fs::remove_file("/tmp/reneg-pwned");
    let err = NegativeEmbedding::load(Path::new(&format!("{FIX}/malicious.pt")))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("os.system") && err.contains("malicious.pt"),
        "{err}"
    );
    assert!(
        !Path::new("/tmp/reneg-pwned").exists(),
        "the payload must never run"
    );
    let err = NegativeEmbedding::load(Path::new(&format!("{FIX}/not_a_tensor.pt")))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("dict") && err.contains("not_a_tensor.pt"),
        "{err}"
    );
    let err = NegativeEmbedding::load(Path::new(&format!("{FIX}/legacy_format.pt")))
        .unwrap_err()
        .to_string();
    assert!(err.contains("legacy"), "{err}");
}

#[test]
fn bad_files_name_themselves() {
    let garbage = tmp("garbage.safetensors");
    std::fs::write(&garbage, b"definitely not a tensor file").unwrap();
    let err = NegativeEmbedding::load(&garbage).unwrap_err().to_string();
    assert!(err.contains("garbage.safetensors"), "{err}");
    let err = NegativeEmbedding::load(Path::new("no/such/emb.bin"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no/such/emb.bin") && err.contains("not found"),
        "{err}"
    );
    // Two tensors in one safetensors file is not an embedding.
    let two = tmp("two.safetensors");
    let t = Tensor::zeros((1, 77, 8), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &[("a".to_string(), t.clone()), ("b".to_string(), t)]
            .into_iter()
            .collect(),
        &two,
    )
    .unwrap();
    let err = NegativeEmbedding::load(&two).unwrap_err().to_string();
    assert!(err.contains("2 tensors"), "{err}");
    // An empty [1, 0, D] or [1, L, 0] tensor (issue 16: `embedding inspect` indexed an empty
    // vector) is refused by name.
    for shape in [(1, 0, 8), (1, 77, 0)] {
        let empty = tmp("empty.safetensors");
        let t = Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(&[("e".to_string(), t)].into_iter().collect(), &empty)
            .unwrap();
        let err = NegativeEmbedding::load(&empty).unwrap_err().to_string();
        assert!(
            err.contains("empty.safetensors") && err.contains("empty tensor"),
            "{err}"
        );
    }
    let empty = NegativeEmbedding::new(Tensor::zeros((1, 0, 8), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    assert!(empty.stats().unwrap_err().to_string().contains("empty"));
}

#[test]
fn width_and_length_are_checked_against_the_model() {
    let emb =
        NegativeEmbedding::new(Tensor::zeros((1, 77, 1024), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
    let err = emb
        .check_fits(
            &reneg::conditioning::Shape::embeds(77, 768),
            Path::new("x.safetensors"),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("1024") && err.contains("768"), "{err}");
    let short =
        NegativeEmbedding::new(Tensor::zeros((1, 60, 768), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
    let err = short
        .check_fits(
            &reneg::conditioning::Shape::embeds(77, 768),
            Path::new("x.safetensors"),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("60") && err.contains("77"), "{err}");
    emb.check_fits(
        &reneg::conditioning::Shape::embeds(77, 1024),
        Path::new("x.safetensors"),
    )
    .unwrap();
}

/// The storage view arithmetic of `torch_file` takes shape, stride and offset from the file:
/// each malformed combination is an error naming the file, never a panic or a huge allocation
/// (issue 16); a legitimate strided view (a transpose) gathers the right values.
#[test]
fn malformed_storage_views_are_errors() {
    use reneg::torch_file::gather;
    use reneg::torch_file::pickle::{StorageDtype, TensorRef};
    let data: Vec<u8> = (0..6u32).flat_map(|v| (v as f32).to_le_bytes()).collect();
    let view = |shape: Vec<usize>, stride: Vec<usize>, offset: usize| TensorRef {
        storage_key: "0".into(),
        dtype: StorageDtype::F32,
        offset,
        shape,
        stride,
    };
    let path = Path::new("weights.pt");
    // [2, 3] stored row-major, read as its transpose [3, 2] with strides (1, 3).
    let (t, _) = gather(&data, &view(vec![3, 2], vec![1, 3], 0), path).unwrap();
    assert_eq!(
        t.to_vec2::<f32>().unwrap(),
        [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    );
    for (name, v) in [
        ("lengths differ", view(vec![2, 3], vec![3], 0)),
        (
            "zero stride, huge shape",
            view(vec![1 << 40, 1 << 20], vec![0, 0], 0),
        ),
        ("shape overflows", view(vec![usize::MAX, 3], vec![3, 1], 0)),
        ("stride overflows", view(vec![2, 3], vec![usize::MAX, 1], 0)),
        ("offset past the storage", view(vec![2, 3], vec![3, 1], 1)),
        ("offset overflows", view(vec![1], vec![1], usize::MAX)),
    ] {
        let err = gather(&data, &v, path).unwrap_err().to_string();
        assert!(
            err.contains("weights.pt") && err.contains("corrupt"),
            "{name}: {err}"
        );
    }
}

#[test]
fn the_same_embedding_is_saved_as_the_same_bytes() {
    // The metadata is a map; saved twice (each save hashes it anew) the bytes must not differ.
    let t = candle_core::Tensor::arange(0f32, 77.0 * 8.0, &candle_core::Device::Cpu)
        .unwrap()
        .reshape((1, 77, 8))
        .unwrap();
    let mut e = reneg::embedding::NegativeEmbedding::new(t).unwrap();
    for k in 0..12 {
        e.metadata.insert(format!("key{k}"), format!("value {k}"));
    }
    let dir = std::env::temp_dir().join(format!("reneg-emb-bytes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (dir.join("a.safetensors"), dir.join("b.safetensors"));
    e.save_safetensors(&a).unwrap();
    e.save_safetensors(&b).unwrap();
    let (ba, bb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert!(ba == bb, "two saves differ");
    // Still a valid file, read back with its metadata.
    let back = reneg::embedding::NegativeEmbedding::load(&a).unwrap();
    assert_eq!(
        back.metadata.get("key7").map(String::as_str),
        Some("value 7")
    );
    let header = String::from_utf8_lossy(
        &ba[8..8 + u64::from_le_bytes(ba[..8].try_into().unwrap()) as usize],
    )
    .to_string();
    let (k1, k2) = (
        header.find("\"key1\"").unwrap(),
        header.find("\"key2\"").unwrap(),
    );
    assert!(k1 < k2, "{header}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A negative of several parts under diffusers' names (issue 30): the dict PyTorch saved and
/// its safetensors twin read as the same three parts (values from tools/gen_embedding_fixtures.py);
/// both writers give them back bit for bit (the .bin as torch.save of a dict, which
/// tools/gen_embedding_fixtures.py's check reads with torch.load); a one-part negative still
/// writes one plain tensor; an SD model refuses the parts it has no place for, by name.
#[test]
fn a_negative_of_several_parts_reads_writes_and_is_refused_by_sd() {
    let fix = Path::new(FIX);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fix.join("manifest.json")).unwrap()).unwrap();
    let want_pooled: Vec<f32> = manifest["parts.pt"]["pooled"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let whole = NegativeEmbedding::load(&fix.join("torch_saved.pt")).unwrap();
    let first5 = whole.tensor.narrow(1, 0, 5).unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let a = NegativeEmbedding::load(&fix.join("parts.pt")).unwrap();
    let b = NegativeEmbedding::load(&fix.join("parts.safetensors")).unwrap();
    for (tag, e) in [("parts.pt", &a), ("parts.safetensors", &b)] {
        let names: Vec<&str> = e.parts().iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "negative_prompt_embeds",
                "negative_pooled_prompt_embeds",
                "negative_prompt_attention_mask"
            ],
            "{tag}"
        );
        assert_eq!(max_abs_diff(&e.tensor, &first5), 0.0, "{tag}");
        assert_eq!(flat(e.pooled.as_ref().unwrap()), want_pooled, "{tag}");
        assert_eq!(
            flat(e.mask.as_ref().unwrap()),
            [1.0, 1.0, 1.0, 0.0, 0.0],
            "{tag}"
        );
    }
    for ext in ["safetensors", "bin"] {
        let p = tmp(&format!("parts.{ext}"));
        a.save(&p).unwrap();
        let back = NegativeEmbedding::load(&p).unwrap();
        for ((n1, t1), (n2, t2)) in a.parts().iter().zip(back.parts().iter()) {
            assert_eq!(n1, n2, "{ext}");
            assert_eq!(flat(t1), flat(t2), "{ext}: {n1}");
        }
        assert_eq!(back.parts().len(), 3, "{ext}");
    }
    // One part: a plain tensor, as the official files and today's exports are.
    let p = tmp("one-part.bin");
    whole.save(&p).unwrap();
    let (t, _) = reneg::torch_file::read(&std::fs::read(&p).unwrap(), &p).unwrap();
    assert_eq!(max_abs_diff(&t, &whole.tensor), 0.0);
    // An SD model has no place for a pooled embedding or a mask.
    let err = a
        .check_fits(
            &reneg::conditioning::Shape::embeds(5, 32),
            Path::new("parts.pt"),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("parts.pt") && err.contains("negative_pooled_prompt_embeds"),
        "{err}"
    );
    // A file of parts without the embeddings, or with a stray name, is refused by name.
    let stray = tmp("stray.safetensors");
    let mut tensors = std::collections::HashMap::new();
    tensors.insert(
        "negative_pooled_prompt_embeds".to_string(),
        a.pooled.clone().unwrap(),
    );
    candle_core::safetensors::save(&tensors, &stray).unwrap();
    let err = NegativeEmbedding::load(&stray).unwrap_err().to_string();
    assert!(err.contains("holds no negative_prompt_embeds"), "{err}");
    tensors.insert("negative_prompt_embeds".to_string(), first5.clone());
    tensors.insert("pooled".to_string(), a.pooled.clone().unwrap());
    candle_core::safetensors::save(&tensors, &stray).unwrap();
    let err = NegativeEmbedding::load(&stray).unwrap_err().to_string();
    assert!(
        err.contains("stray.safetensors") && err.contains("pooled"),
        "{err}"
    );
}

/// A family whose negatives have a pooled part (SDXL's shape) refuses one without it, or with
/// one of another width, naming the file and the part.
#[test]
fn a_pooled_part_the_model_needs_is_checked() {
    let shape = reneg::conditioning::Shape {
        tokens: 77,
        width: 8,
        pooled: Some(4),
        mask: false,
    };
    let zeros = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
    let mut emb = NegativeEmbedding::new(zeros(&[1, 77, 8])).unwrap();
    let err = emb
        .check_fits(&shape, Path::new("xl.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("xl.safetensors") && err.contains("has no negative_pooled_prompt_embeds"),
        "{err}"
    );
    emb.pooled = Some(zeros(&[1, 3]));
    let err = emb
        .check_fits(&shape, Path::new("xl.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("[1, 4]") && err.contains("[1, 3]"), "{err}");
    emb.pooled = Some(zeros(&[1, 4]));
    emb.check_fits(&shape, Path::new("xl.safetensors")).unwrap();
}

#!/usr/bin/env python3
"""Plants each bug of issue 29 in the working tree, one at a time, runs the tests that should catch it,
restores the file, and appends what happened to docs/results/planted-bugs.txt (or --log FILE).

    python3 tools/plant_bugs.py [NAME-PREFIX ...]      # e.g. 1 5a 8

Never in CI: each plant rebuilds the tests (a minute or two). Run it on a clean tree: it rewrites files
in place and restores them from memory, so an interrupted run may leave a plant behind (git diff shows it).
A plant whose tests still pass is a test that does not guard what it is named for.
"""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plant(name, path, old, new, cmd, log):
    full = os.path.join(REPO, path)
    orig = open(full).read()
    count = orig.count(old)
    if count < 1:
        sys.exit(f"{name}: the text to replace is not in {path} (the code moved: update the plant)")
    try:
        open(full, "w").write(orig.replace(old, new))
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    finally:
        open(full, "w").write(orig)
    out = r.stdout + r.stderr
    lines = out.splitlines()
    with open(log, "a") as f:
        f.write(f"## {name}\nplanted in {path} ({count} place(s)): {old.strip()[:120]!r} -> {new.strip()[:120]!r}\n")
        verdict = "FAILED: the bug is caught" if r.returncode else "PASSED: the bug is NOT caught"
        f.write(f"command: {' '.join(cmd)}\nexit code: {r.returncode} ({verdict})\n")
        for l in lines:
            if l.startswith("test ") and ("FAILED" in l or " ok" in l):
                f.write(l + "\n")
        msgs = [l + " | " + (lines[i + 1][:300] if i + 1 < len(lines) else "")
                for i, l in enumerate(lines) if "panicked at" in l]
        for m in msgs[:4]:
            f.write("  " + m + "\n")
        for l in lines:
            if l.rstrip().endswith(" FAIL") or "did not run" in l:
                f.write("  " + l.strip()[:200] + "\n")
        f.write("\n")
    print(name, "caught" if r.returncode else "NOT CAUGHT")
    return r.returncode != 0


T = lambda *a: ["cargo", "test", "--release", "--workspace", "--no-fail-fast"] + list(a)
plants = [
 ("1 resume restarts from step 0", "src/train/global.rs",
  """        (
            ck.embedding
                .map(|_, t| Ok(t.to_dtype(DType::F32)?.to_device(&device)?))?,
            ck.optimizer
                .iter()
                .map(|o| o.to_device(&device))
                .collect::<Result<Vec<_>>>()?,
            ck.step,
            ck.bad_in_row,
            ck.loss_scaler,
        )""",
  """        {
            let _ = ck;
            if main {
                for p in [paths.metrics(), paths.validation()] {
                    let _ = std::fs::remove_file(p);
                }
            }
            let init = init.map(|_, t| Ok(t.to_dtype(DType::F32)?.to_device(&device)?))?;
            let opt = for_learned(&adam_cfg, &init)?;
            (init, opt, 0, 0, LossScaler::for_precision(cfg.precision))
        }""",
  T("--test", "train", "--test", "interrupt", "--test", "cli", "--", "interrupted_and_resumed", "killed_train", "train_from_toml")),
 ("2 ranks compute every micro-batch", "src/train/global.rs",
  """            if !world.owns(index) {
                continue;
            }""", "",
  T("--test", "scale_out", "--", "two_ranks")),
 ("3 checkpoint2 calls its function directly", "src/nn/attach.rs",
  """    let (tx, tc) = (super::dispatch::tracked(x), super::dispatch::tracked(ctx));
    if !tx && !tc {""",
  """    #[allow(clippy::needless_return)]
    return f(x, ctx);
    #[allow(unreachable_code)]
    let (tx, tc) = (super::dispatch::tracked(x), super::dispatch::tracked(ctx));
    if !tx && !tc {""",
  T("--test", "dispatch", "--test", "cli", "--", "checkpointing")),
 ("4a a bad-input fixture named relative to the workspace root", "crates/cli/tests/bad_inputs.rs",
  """const LEGACY: &str = repo!("tests/fixtures/embedding/legacy_format.pt");""",
  """const LEGACY: &str = "tests/fixtures/embedding/legacy_format.pt";""",
  T("--test", "bad_inputs")),
 ("4b the legacy-format refusal never reached", "src/embedding/mod.rs",
  """"legacy (pre-1.6) PyTorch format; re-save""", """"cannot read this file; re-save""",
  T("--test", "bad_inputs")),
 ("5a the manifest forgets --precision", "crates/cli/src/cli/eval.rs",
  """        precision: args.precision.name().to_string(),""", """        precision: "f32".to_string(),""",
  T("--test", "eval", "--", "resuming_with_other_settings")),
 ("5b the manifest forgets the files' content", "crates/cli/src/cli/eval.rs",
  """        files: stamped_files(args, specs, &prompts)?,""",
  """        files: { let _ = stamped_files(args, specs, &prompts)?; vec![] },""",
  T("--test", "eval", "--", "resuming_with_other_settings")),
 ("5c the manifest records the files without their content", "src/eval/mod.rs",
  """            crate::io::content_hash(path)?""", """            String::new()""",
  T("--test", "eval", "--", "resuming_with_other_settings")),
 ("6a a parser that refuses every checkpoint", "src/train/checkpoint.rs",
  """        let bytes = std::fs::read(path)
            .map_err(|e| Error::file(path, format!("cannot read checkpoint: {e}")))?;""",
  """        let bytes: Vec<u8> = std::fs::read(path)
            .map_err(|e| Error::file(path, format!("cannot read checkpoint: {e}")))?;
        if !bytes.is_empty() {
            return Err(Error::file(path, "planted: refused"));
        }""",
  T("--test", "fuzz")),
 ("6b NaN timesteps let through (the bug the timestep property found)", "src/scheduler/schedule.rs",
  """.find(|&&v| !(0.0..t as f64).contains(&v))""", """.find(|&&v| v < 0.0 || v >= t as f64)""",
  T("--test", "fuzz")),
 ("7a a text encoder off by 1e-5 (layer norm eps x3)", "src/models/clip_text.rs",
  """                    cfg.layer_norm_eps,""", """                    cfg.layer_norm_eps * 3.0,""",
  T("--test", "parity", "--", "parity_cases")),
 ("7b a committed case that drops out", "tests/common/mod.rs",
  """        find_cases(&r, 4, &mut cases);""",
  """        find_cases(&r, 4, &mut cases);
        cases.retain(|c| !c.ends_with("text2video-zs-tiny"));""",
  T("--test", "train", "--test", "parity", "--", "training_step_gradient", "parity_cases")),
 ("8a layer norm's closed-form backward wrong", "src/nn/norm.rs",
  """.sub(&xhat.broadcast_mul(&mean_gx)?)?""", """.sub(&xhat.broadcast_mul(&(mean_gx * 0.9)?)?)?""",
  T("--test", "dispatch")),
 ("8b the official embedding misread (halved)", "src/embedding/mod.rs",
  """            embeds: self.tensor.clone(),""",
  """            embeds: (&self.tensor * 0.5)?,""",
  T("--test", "official")),
 ("8c ReNeg's gradient sign-flipped", "src/train/step.rs",
  """grad: grad.into_iter().map(unscale).collect::<Result<_>>()?,""",
  """grad: grad.into_iter().map(|g| unscale(g.neg()?)).collect::<Result<_>>()?,""",
  T("--test", "video", "--", "train_on_clips")),
 ("8d PNDM's x0 at the wrong timestep", "src/scheduler/pndm.rs",
  """            sched.timesteps[i] as usize,
            sample,
            false,""", """            sched.timesteps[i] as usize + 20,
            sample,
            false,""",
  T("--test", "schedulers")),
 ("9 guidance_rescale ignored", "src/guidance.rs",
  """    if rescale == 0.0 {""", """    if rescale >= 0.0 {""",
  T("--test", "parity", "--test", "train", "--", "parity_cases", "training_step_gradient")),
 ("8e fp16 autocast that runs wholly in f32", "src/weights.rs",
  """    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {""",
  """    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let dtype = if dtype == DType::F16 { DType::F32 } else { dtype };""",
  T("--test", "scale_out", "--", "fp16_autocast")),
 # Issue 30: the seam's multi-part negative and the branches run apart.
 ("10a the mask learned as a floating part", "src/conditioning.rs",
  """        self != Part::Mask""", """        true""",
  T("--test", "seam")),
 ("10b a checkpoint without the pooled part's moments", "src/train/checkpoint.rs",
  """        for ((p, _), opt) in self.embedding.learned().into_iter().zip(&self.optimizer) {""",
  """        for ((p, _), opt) in self.embedding.learned().into_iter().zip(&self.optimizer).take(1) {""",
  T("--test", "seam")),
 ("10c branches run apart without A1111's padding", "src/pipeline.rs",
  """        if uncond.embeds.dim(1)? == cond.embeds.dim(1)? {""", """        if true {""",
  T("--test", "seam")),
 ("10d ranks exchange only the embeddings' gradient", "src/train/distributed.rs",
  """        let names: Vec<String> = (0..c.grad.len()).map(grad_name).collect();""",
  """        let names: Vec<String> = (0..1).map(grad_name).collect();""",
  T("--test", "seam")),
 # Issue 31: VideoCrafter2's sampler and frame-rate conditioning.
 ("11a lvdm's x0 not divided by scale_arr", "src/scheduler/ddim.rs",
  """        Some(s) => (x0 / s)?,""", """        Some(_) => x0,""",
  T("--test", "parity", "--test", "videocrafter")),
 ("11b lvdm's last step to alpha-bar 1", "src/family/videocrafter/config.rs",
  """            "set_alpha_to_one": false,""", """            "set_alpha_to_one": true,""",
  T("--test", "parity", "--test", "videocrafter")),
 ("11c the frame rate fixed at 28", "src/family/sd.rs",
  """sinusoid(&vec![self.fps; b]""", """sinusoid(&vec![28.0; b]""",
  T("--test", "parity", "--test", "gradcheck", "--", "parity_cases", "frame_rate")),
 ("11d lvdm's uniform timesteps cut to the steps asked", "src/scheduler/schedule.rs",
  """        TimestepSpacing::Uniform => (0..t)""", """        TimestepSpacing::Uniform => (0..t / steps * steps)""",
  T("--test", "parity", "--test", "videocrafter")),
 ("12a SDXL's pooled embedding at the end of text with an inversion in the prompt", "src/family/sdxl.rs",
  """                PromptSyntax::Plain => self.added_token_ids(c2)?,""", """                PromptSyntax::Plain => ids_2.clone(),""",
  T("--test", "sdxl_extras")),
 ("12b the original UNet's upsampler index always .2.", "src/lora.rs",
  """let k = if self.up_with_attention.contains(&b) {""", """let k = if true {""",
  T("--test", "single_file", "--", "kohya")),
 ("12c A1111 emphasis on the two encoders' concatenation", "src/family/sdxl.rs",
  """            embeds.push(Tensor::cat(&[&h1, &h2], 2)?);""", """            embeds.push(c.emphasize(Tensor::cat(&[&h1.clone(), &h2], 2)?)?); let _ = (h1, h2);""",
  T("--test", "sdxl_extras")),
 ("12d SDXL clip skip read one layer late", "src/models/clip_text.rs",
  """        let read = self.layers.len() - 1 - self.clip_skip;""", """        let read = self.layers.len() - 1 - self.clip_skip.saturating_sub(1);""",
  T("--test", "sdxl_extras")),
 ("12e a transformers-4 PEFT text key misses a transformers-5 model", "src/lora.rs",
  """                let bare = m.name.strip_prefix("text_model.").unwrap_or(&m.name);""", """                let bare = m.name.as_str();""",
  T("--test", "sdxl_extras", "--", "transformers_4")),
 ("13a PixArt's cross-attention mask left out", "src/models/pixart.rs",
  """        let bias = match mask {
            Some(m) => Some(""", """        let bias = match None::<&Tensor> {
            Some(m) => Some(""",
  T("--test", "parity", "--", "parity_cases")),
 ("13b learned sigma: the variance half taken for the noise", "src/family/pixart.rs",
  """            out.narrow(1, 0, c)?""", """            out.narrow(1, c, c)?""",
  T("--test", "parity", "--test", "gradcheck")),
 ("13c T5 without its padding mask", "src/models/t5.rs",
  """            bias = bias.broadcast_add(&additive)?;""", """            let _ = additive;""",
  T("--test", "t5", "--test", "parity", "--", "t5_encoder", "parity_cases")),
 ("13d spiece.model read without the dummy prefix", "src/t5_tokenizer.rs",
  """            PrependScheme::Always
""", """            PrependScheme::Never
""",
  T("--test", "t5")),
 ("13e the official PixArt embedding given an all-ones mask", "src/embedding/mod.rs",
  """        m[0] = 1.0;""", """        m.iter_mut().for_each(|v| *v = 1.0);""",
  T("-p", "reneg-cli", "--test", "pixart")),
 ("14a the page's sort by the largest gain reversed", "src/eval/html.rs",
  """      var sign = state.sort === 'desc' ? -1 : 1;""", """      var sign = state.sort === 'desc' ? 1 : -1;""",
  T("-p", "reneg-cli", "--test", "report_page")),
 ("14b the page's data block not guarded against </script>", "src/eval/html.rs",
  r"""    v.to_string().replace('<', "\\u003c")""", """    v.to_string()""",
  T("-p", "reneg-cli", "--test", "report_page")),
]


def main():
    args = sys.argv[1:]
    log = os.path.join(REPO, "docs/results/planted-bugs.txt")
    if "--log" in args:
        i = args.index("--log")
        log = args[i + 1]
        del args[i:i + 2]
    missed = [name for name, f, old, new, cmd in plants
              if (not args or any(name.startswith(a) for a in args))
              and not plant(name, f, old, new, cmd, log)]
    if missed:
        sys.exit(f"not caught: {missed}")


if __name__ == "__main__":
    main()

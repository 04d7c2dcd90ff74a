//! Frozen f32 linear weights kept in the AVX-512 gemm micro-kernel's own panel layout.
//!
//! gemm (the crate candle and [`super::cpu_linear`] call) repacks the weight into panels on
//! every call: it reads `Wᵀ` row by row, 64 outputs at a time from rows `4 x out` bytes apart,
//! and writes the panel before its micro-kernel reads it. For SDXL's 1280-wide layers at 64
//! tokens (its 8x8 level at 32x32 latents, batch 1), that packing and the strided reads
//! behind it halve the throughput: the weights are used by few rows each, so the micro-kernel
//! waits on them (110-125 GFLOP/s against 200-220 here; `benches/results/packed-gemm-session6.txt`).
//! Frozen weights never change, so they are packed once, when the layer is built, and every
//! call streams them sequentially.
//!
//! The layout: panels of [`MR`] = 64 outputs, each `[in][64]` contiguous (the last panel padded
//! with zeros), 64-byte aligned. A call runs gemm's own AVX-512 micro-kernel on each tile of
//! (panel, [`NR`] = 6 rows of activations), the threads splitting the tiles.
//!
//! Only where the CPU has AVX-512 ([`available`]); elsewhere the layer keeps `Wᵀ` as a tensor
//! and gemm packs it as before. The input gradient (`dy W`, no gradient for the frozen weight)
//! packs `W` for its call from the panels (the weight is kept once, in one orientation).

use super::cpu_kernel::contiguous;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use std::sync::Arc;

/// Outputs per panel: the micro-kernel's 4 vectors of 16 f32.
pub const MR: usize = 64;
/// Activation rows per tile: the micro-kernel's 6 broadcast columns.
pub const NR: usize = 6;
/// Inputs per pass over a tile: a panel's `kc x 64` slice (128 KB) stays in L2 while every
/// tile of its rows passes it.
const KC: usize = 512;

/// One cache line of f32, so that the panels start on a line (an unaligned panel reads five
/// lines for every four).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

static DISABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Layers built after this keep `Wᵀ` as a tensor, as on a CPU without AVX-512 (for A/B runs:
/// the benchmark's `RENEG_BENCH_UNPACKED=1`).
pub fn disable() {
    DISABLED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Whether layers built now pack their frozen f32 weights: the CPU runs the AVX-512
/// micro-kernel (checked once) and [`disable`] was not called.
pub fn available() -> bool {
    !DISABLED.load(std::sync::atomic::Ordering::Relaxed) && avx512()
}

fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVX512: OnceLock<bool> = OnceLock::new();
        *AVX512.get_or_init(|| std::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A frozen `[in, out]` f32 weight (`Wᵀ`) in panels of [`MR`] outputs.
pub struct PackedWeight {
    /// Inputs (`in`).
    k: usize,
    /// Outputs (`out`).
    n: usize,
    /// `panels x k x MR` f32, as lines.
    data: Vec<Line>,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight[{}, {}]", self.k, self.n)
    }
}

impl PackedWeight {
    /// Packs `w`, the `[n, k]` (`[out, in]`) weight as stored, row-major: each panel reads 64
    /// of its rows, so the layer needs no transposed copy first.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(
            w.len(),
            k * n,
            "PackedWeight::pack: {} values for [{n}, {k}]",
            w.len()
        );
        let panels = n.div_ceil(MR);
        let mut data = vec![Line([0.0; 16]); panels * k * MR / 16];
        let flat = floats_mut(&mut data);
        for ib in 0..panels {
            let panel = &mut flat[ib * k * MR..][..k * MR];
            for r in 0..MR.min(n - ib * MR) {
                let row = &w[(ib * MR + r) * k..][..k];
                for (p, &v) in row.iter().enumerate() {
                    panel[p * MR + r] = v;
                }
            }
        }
        Self { k, n, data }
    }

    /// `(in, out)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// `Wᵀ` back as `[k, n]` row-major.
    pub fn unpacked(&self) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        let flat = floats(&self.data);
        let mut out = Vec::with_capacity(k * n);
        for p in 0..k {
            for ib in 0..n.div_ceil(MR) {
                out.extend_from_slice(&flat[(ib * k + p) * MR..][..MR.min(n - ib * MR)]);
            }
        }
        out
    }

    /// `x[rows x k] W^T + bias`, `[rows, n]` row-major.
    pub fn forward(&self, x: &[f32], rows: usize, bias: Option<&[f32]>) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        assert_eq!(
            x.len(),
            rows * k,
            "PackedWeight::forward: {} values for [{rows}, {k}]",
            x.len()
        );
        if let Some(b) = bias {
            assert_eq!(
                b.len(),
                n,
                "PackedWeight::forward: {} bias values for {n} outputs",
                b.len()
            );
        }
        if rows == 0 || n == 0 {
            return Vec::new();
        }
        if k == 0 {
            return match bias {
                Some(b) => b.repeat(rows),
                None => vec![0.0; rows * n],
            };
        }
        run(Source::Panels(self), x, rows, bias)
    }

    /// `dy[rows x n] W`, `[rows, k]`: the input's gradient. The tiles read `W` from the
    /// panels, transposed a 64 x [`KC`] chunk at a time into a buffer of each thread's (as gemm
    /// packs), so the weight is not copied whole.
    pub fn input_grad(&self, dy: &[f32], rows: usize) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        assert_eq!(
            dy.len(),
            rows * n,
            "PackedWeight::input_grad: {} values for [{rows}, {n}]",
            dy.len()
        );
        if rows == 0 || k == 0 {
            return Vec::new();
        }
        if n == 0 {
            return vec![0.0; rows * k];
        }
        run(Source::Transposed(self), dy, rows, None)
    }

    /// Writes into `buf` the chunk `p0..p0 + depth` (outputs of this matrix; a multiple of 64
    /// from `p0`, itself one) of panel `pb` of the transpose (inputs `pb*64..`), as `[depth][64]`.
    fn transposed_chunk(&self, pb: usize, p0: usize, depth: usize, buf: &mut [f32]) {
        let (k, src) = (self.k, floats(&self.data));
        let rows = MR.min(k - pb * MR);
        for ib in p0 / MR..(p0 + depth).div_ceil(MR) {
            // Inputs pb*64.. of panel ib: `rows` consecutive rows of 64 outputs (16 KB).
            let block = &src[(ib * k + pb * MR) * MR..][..rows * MR];
            let width = MR.min(self.n - ib * MR);
            let out = &mut buf[(ib * MR - p0) * MR..];
            for (j, row) in block.chunks_exact(MR).enumerate() {
                for (ii, &v) in row[..width].iter().enumerate() {
                    out[ii * MR + j] = v;
                }
            }
        }
    }
}

fn floats(lines: &[Line]) -> &[f32] {
    // SAFETY: Line is repr(C) over [f32; 16] with no padding (64 bytes, align 64).
    unsafe { std::slice::from_raw_parts(lines.as_ptr().cast(), lines.len() * 16) }
}

fn floats_mut(lines: &mut [Line]) -> &mut [f32] {
    // SAFETY: as in `floats`.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast(), lines.len() * 16) }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the threads write disjoint tiles of the output (see `run_tiles`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

fn thread_count() -> usize {
    match super::cpu_conv::threads() {
        Parallelism::None => 1,
        Parallelism::Rayon(n) => n.max(1),
    }
}

/// Where the tiles' panels come from.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// The weight's panels, read in place: `x Wᵀ`.
    Panels(&'a PackedWeight),
    /// The transpose, chunk by chunk into a buffer: `dy W`.
    Transposed(&'a PackedWeight),
}

impl Source<'_> {
    /// (outputs, depth) of the product.
    fn dims(self) -> (usize, usize) {
        match self {
            Source::Panels(w) => (w.n, w.k),
            Source::Transposed(w) => (w.k, w.n),
        }
    }

    /// Passes over the depth: balanced for the panels (any start), 512 deep for the transpose
    /// (its chunks start on a panel of the weight).
    fn pass_depth(self) -> usize {
        let depth = self.dims().1;
        match self {
            Source::Panels(_) => depth.div_ceil(depth.div_ceil(KC)),
            Source::Transposed(_) => KC,
        }
    }

    /// The `depth x MR` chunk from `p0` of output panel `ib`, with `MR` between its steps.
    fn chunk(self, ib: usize, p0: usize, depth: usize, buf: &mut Vec<f32>) -> *const f32 {
        match self {
            Source::Panels(w) => floats(&w.data)[(ib * w.k + p0) * MR..].as_ptr(),
            Source::Transposed(w) => {
                buf.resize(KC * MR, 0.0);
                w.transposed_chunk(ib, p0, depth, buf);
                buf.as_ptr()
            }
        }
    }
}

/// `x[rows x depth]` times the source's matrix (+ bias): `[rows, outputs]`, on AVX-512.
fn run(src: Source, x: &[f32], rows: usize, bias: Option<&[f32]>) -> Vec<f32> {
    let n = src.dims().0;
    let mut out = Vec::with_capacity(rows * n);
    assert!(avx512(), "nn::cpu_packed needs AVX-512");
    // SAFETY: AVX-512 is present (checked); `out` has room for rows x n, every element of
    // which `run_tiles` writes (each tile by one thread, its first pass writing without
    // reading); x is rows x depth and each chunk holds depth x MR values.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        run_tiles(src, x, rows, bias, out.as_mut_ptr());
        out.set_len(rows * n);
    }
    out
}

/// Every (panel, 6 rows) tile of the product; the tiles, panel by panel, split into one
/// contiguous range per thread, so a tile is one thread's. For each panel a thread takes the
/// depth in passes: the panel's chunk (128 KB) stays in L2 while each of the thread's tiles
/// of that panel passes it. The micro-kernel broadcasts `x` from its rows in place (6 rows a
/// tile, each read in order), so the activations are not copied; the first pass writes a tile
/// (onto its bias, copied in first) and the later ones add to it.
///
/// # Safety
/// AVX-512 must be present; `x` is `rows x depth`, `bias` has one value per output, `out` has
/// room for `rows x outputs`, and rows, outputs and depth are not 0.
#[cfg(target_arch = "x86_64")]
unsafe fn run_tiles(src: Source, x: &[f32], rows: usize, bias: Option<&[f32]>, out: *mut f32) {
    use gemm_f32::microkernel::avx512f::f32::UKR;
    let (n, k) = src.dims();
    let (panels, n_strips) = (n.div_ceil(MR), rows.div_ceil(NR));
    let tiles = panels * n_strips;
    // Small products stay on the calling thread (no wake-up), as gemm does below its threshold.
    let threads = if rows * k * n < 48 * 48 * 256 {
        1
    } else {
        thread_count().min(tiles)
    };
    let kc = src.pass_depth();
    let dst = SendPtr(out);
    let work = move |t: usize| {
        let dst = dst;
        let mut buf = Vec::new();
        let (from, to) = (tiles * t / threads, tiles * (t + 1) / threads);
        let mut first = from;
        while first < to {
            let ib = first / n_strips;
            let last = to.min((ib + 1) * n_strips);
            let m = MR.min(n - ib * MR);
            let mut p0 = 0;
            while p0 < k {
                let depth = kc.min(k - p0);
                let lhs = src.chunk(ib, p0, depth, &mut buf);
                for s in first - ib * n_strips..last - ib * n_strips {
                    let cols = NR.min(rows - s * NR);
                    let tile_dst = dst.0.add(s * NR * n + ib * MR);
                    // 0: write, 1: add onto what is there (the bias, or an earlier pass).
                    let mut accumulate = u8::from(p0 > 0);
                    if let (0, Some(b)) = (p0, bias) {
                        for c in 0..cols {
                            std::ptr::copy_nonoverlapping(
                                b.as_ptr().add(ib * MR),
                                tile_dst.add(c * n),
                                m,
                            );
                        }
                        accumulate = 1;
                    }
                    let kernel = UKR[m.div_ceil(16) - 1][cols - 1];
                    kernel(
                        m,
                        cols,
                        depth,
                        tile_dst,
                        lhs,
                        x.as_ptr().add(s * NR * k + p0),
                        n as isize,
                        1,
                        MR as isize,
                        1,
                        k as isize,
                        1.0,
                        1.0,
                        accumulate,
                        false,
                        false,
                        false,
                        std::ptr::null(),
                    );
                }
                p0 += depth;
            }
            first = last;
        }
    };
    if threads == 1 {
        work(0);
    } else {
        rayon::scope(|scope| {
            for t in 1..threads {
                scope.spawn(move |_| work(t));
            }
            work(0);
        });
    }
}

/// The forward as a candle op: x (and the bias) on the CPU in f32, the weight in the op.
struct Forward(Arc<PackedWeight>);

impl Forward {
    fn run(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, k) = xl.shape().dims2()?;
        let (kw, n) = self.0.dims();
        if k != kw {
            candle_core::bail!("linear: input has {k} features, the weight takes {kw}")
        }
        let bias = bias
            .map(|(b, bl)| contiguous(b.as_slice::<f32>()?, bl))
            .transpose()?;
        if let Some(b) = bias {
            if b.len() != n {
                candle_core::bail!("linear: bias of {} values for {n} outputs", b.len())
            }
        }
        let x = contiguous(x.as_slice::<f32>()?, xl)?;
        Ok((
            CpuStorage::F32(self.0.forward(x, rows, bias)),
            Shape::from((rows, n)),
        ))
    }
}

impl CustomOp1 for Forward {
    fn name(&self) -> &'static str {
        "cpu-packed-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(x, xl, None)
    }
}

impl CustomOp2 for Forward {
    fn name(&self) -> &'static str {
        "cpu-packed-linear-bias"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(x, xl, Some((b, bl)))
    }
}

/// The input gradient as a candle op: `dy` on the CPU in f32.
struct InputGrad(Arc<PackedWeight>);

impl CustomOp1 for InputGrad {
    fn name(&self) -> &'static str {
        "cpu-packed-linear-input-grad"
    }

    fn cpu_fwd(&self, dy: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, n) = l.shape().dims2()?;
        let (k, nw) = self.0.dims();
        if n != nw {
            candle_core::bail!("linear backward: gradient has {n} features, the weight gives {nw}")
        }
        let dy = contiguous(dy.as_slice::<f32>()?, l)?;
        Ok((
            CpuStorage::F32(self.0.input_grad(dy, rows)),
            Shape::from((rows, k)),
        ))
    }
}

/// `x2 Wᵀ + bias` for `x2`: `[rows, in]` f32 on the CPU, without a graph.
pub fn linear(x2: &Tensor, w: &Arc<PackedWeight>, bias: Option<&Tensor>) -> Result<Tensor> {
    let x2 = x2.detach().contiguous()?;
    let op = Forward(w.clone());
    match bias {
        Some(b) => x2.apply_op2_no_bwd(&b.detach().contiguous()?, &op),
        None => x2.apply_op1_no_bwd(&op),
    }
}

/// `dy W` for `dy`: `[rows, out]` f32 on the CPU, without a graph.
pub fn input_grad(dy: &Tensor, w: &Arc<PackedWeight>) -> Result<Tensor> {
    dy.detach()
        .contiguous()?
        .apply_op1_no_bwd(&InputGrad(w.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / 16_777_216.0 - 0.5
            })
            .collect()
    }

    #[test]
    fn unpacking_gives_the_weight_back() {
        for (k, n) in [(3, 5), (7, 64), (5, 130), (0, 4), (4, 0)] {
            let w_t = values(k * n, 7);
            let w: Vec<f32> = (0..n)
                .flat_map(|i| (0..k).map(move |p| p * n + i))
                .map(|j| w_t[j])
                .collect();
            assert_eq!(PackedWeight::pack(&w, n, k).unpacked(), w_t, "[{k}, {n}]");
        }
    }

    #[test]
    fn the_transposed_chunks_hold_the_transpose() {
        for (k, n) in [(3, 5), (70, 64), (130, 1100), (64, 513)] {
            let w = values(k * n, 9);
            let w_out_in: Vec<f32> = (0..n)
                .flat_map(|i| (0..k).map(move |p| p * n + i))
                .map(|j| w[j])
                .collect();
            let packed = PackedWeight::pack(&w_out_in, n, k);
            let mut buf = vec![f32::NAN; KC * MR];
            for pb in 0..k.div_ceil(MR) {
                for p0 in (0..n).step_by(KC) {
                    let depth = KC.min(n - p0);
                    packed.transposed_chunk(pb, p0, depth, &mut buf);
                    for d in 0..depth {
                        for j in 0..MR.min(k - pb * MR) {
                            let want = w[(pb * MR + j) * n + p0 + d];
                            assert_eq!(buf[d * MR + j], want, "[{k}, {n}] panel {pb} from {p0}");
                        }
                    }
                }
            }
        }
    }
}

use candle_core::{DType, Device};
use std::time::Instant;
fn main() {
    let dev = Device::Cpu;
    for &(c, hw) in &[(256usize, 64usize), (128, 128), (512, 16), (512, 32)] {
        let x = reneg::rng::randn(1, &[1, c, hw, hw], DType::F32, &dev).unwrap();
        let k = reneg::rng::randn(2, &[c, c, 3, 3], DType::F32, &dev).unwrap();
        let _ = reneg::nn::cpu_conv::forward(&x, &k, None, 1, 1).unwrap();
        let t = Instant::now();
        for _ in 0..3 {
            let _ = reneg::nn::cpu_conv::forward(&x, &k, None, 1, 1).unwrap();
        }
        let s = t.elapsed().as_secs_f64() / 3.0;
        let fl = 2.0 * (c * c * 9 * hw * hw) as f64;
        let a = reneg::nn::cpu_conv::forward(&x, &k, None, 1, 1).unwrap();
        let t = Instant::now();
        for _ in 0..3 {
            let _ = reneg::nn::cpu_conv::input_grad(&a, &k, 1, 1, hw, hw).unwrap();
        }
        let sg = t.elapsed().as_secs_f64() / 3.0;
        let xm = x.reshape((c, hw * hw)).unwrap();
        let km = k.reshape((c, c * 9)).unwrap();
        let cols = reneg::rng::randn(3, &[c * 9, hw * hw], DType::F32, &dev).unwrap();
        let t = Instant::now();
        for _ in 0..3 {
            let _ = km.matmul(&cols).unwrap();
        }
        let sm = t.elapsed().as_secs_f64() / 3.0;
        let _ = xm;
        println!(
            "c{c} {hw}x{hw}: fwd {:.3}s {:.0} GF/s, grad {:.3}s {:.0} GF/s, bare matmul {:.0} GF/s",
            s,
            fl / s / 1e9,
            sg,
            fl / sg / 1e9,
            fl / sm / 1e9
        );
    }
}

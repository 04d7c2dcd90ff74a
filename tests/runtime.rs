//! `reneg::runtime`'s process-wide settings. One test in its own process: `fix_thread_count`
//! writes the environment, which must not race other tests' threads.

#[test]
fn thread_count_is_fixed_once_to_candles_own() {
    let user = std::env::var("RAYON_NUM_THREADS").ok();
    let candle = candle_core::utils::get_num_threads();
    let n = reneg::runtime::fix_thread_count();
    assert_eq!(n, candle);
    let now = std::env::var("RAYON_NUM_THREADS").unwrap();
    match user {
        // A user's own setting is left alone.
        Some(user) => assert_eq!(now, user),
        None => assert_eq!(now, n.to_string()),
    }
    assert_eq!(candle_core::utils::get_num_threads(), n);
    assert!(reneg::runtime::keep_freed_memory() || !cfg!(target_env = "gnu"));
}

//! Videos as files: an animated PNG (APNG, which browsers play), and MP4 through an `ffmpeg`
//! binary when one is on the PATH. Frames are 8-bit RGB ([`crate::io::Rgb`]), all one size.

use crate::error::{Error, Result};
use crate::io::{write_atomic_with, Rgb};
use std::io::Write;
use std::path::Path;

fn check_frames(frames: &[Rgb], path: &Path) -> Result<(u32, u32)> {
    let first = frames
        .first()
        .ok_or_else(|| Error::file(path, "a video needs at least one frame"))?;
    if frames
        .iter()
        .any(|f| f.width != first.width || f.height != first.height)
    {
        return Err(Error::file(
            path,
            "the frames of a video must share one size",
        ));
    }
    Ok((first.width as u32, first.height as u32))
}

/// Writes `frames` as an animated PNG playing at `fps` in a loop, atomically, with an optional
/// `parameters` text chunk (the generation settings, as for images).
pub fn write_apng(frames: &[Rgb], fps: u32, path: &Path, parameters: Option<&str>) -> Result<()> {
    let (width, height) = check_frames(frames, path)?;
    if fps == 0 {
        return Err(Error::Invalid(
            "frames per second must be at least 1".into(),
        ));
    }
    write_atomic_with(path, |f| {
        let mut enc = png::Encoder::new(std::io::BufWriter::new(f), width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        // 0 plays: loop forever.
        enc.set_animated(frames.len() as u32, 0)
            .map_err(std::io::Error::other)?;
        enc.set_frame_delay(1, fps as u16)
            .map_err(std::io::Error::other)?;
        if let Some(text) = parameters {
            enc.add_text_chunk("parameters".into(), text.into())
                .map_err(std::io::Error::other)?;
        }
        let mut w = enc.write_header().map_err(std::io::Error::other)?;
        for frame in frames {
            w.write_image_data(&frame.data)
                .map_err(std::io::Error::other)?;
        }
        w.finish().map_err(std::io::Error::other)
    })
}

/// The `ffmpeg` on the PATH, if any.
pub fn find_ffmpeg() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("ffmpeg"))
        .find(|p| p.is_file())
}

/// Encodes `frames` as H.264 MP4 (yuv420p, what players expect) at `fps` with `ffmpeg`,
/// atomically: ffmpeg writes a temporary file that is renamed on success. Odd sizes are padded
/// by one pixel (yuv420p needs even ones).
pub fn write_mp4(frames: &[Rgb], fps: u32, path: &Path, ffmpeg: &Path) -> Result<()> {
    let (width, height) = check_frames(frames, path)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}.mp4", std::process::id()));
    let fail = |what: String| {
        let _ = std::fs::remove_file(&tmp);
        Error::file(path, what)
    };
    let mut child = std::process::Command::new(ffmpeg)
        .args([
            "-loglevel",
            "error",
            "-y",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
        ])
        .args(["-s", &format!("{width}x{height}"), "-r", &fps.to_string()])
        .args(["-i", "-", "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"])
        .args(["-c:v", "libx264", "-pix_fmt", "yuv420p", "-f", "mp4"])
        .arg(&tmp)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run {}: {e}", ffmpeg.display())))?;
    {
        let mut stdin = child.stdin.take().expect("piped stdin");
        for frame in frames {
            if let Err(e) = stdin.write_all(&frame.data) {
                // ffmpeg stopped reading: its exit status and message say why.
                let _ = e;
                break;
            }
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("ffmpeg: {e}")))?;
    if !out.status.success() || !tmp.is_file() {
        let msg = String::from_utf8_lossy(&out.stderr);
        let last = msg.lines().last().unwrap_or("no message");
        return Err(fail(format!("ffmpeg failed ({}): {last}", out.status)));
    }
    std::fs::rename(&tmp, path).map_err(|e| fail(format!("cannot write: {e}")))
}

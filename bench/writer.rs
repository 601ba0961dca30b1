//! Writer micro-benchmark: durable single-row commits per second through the group-commit
//! writer at 1, 8 and 64 concurrent callers, next to the physical limit of the disk —
//! raw single-row SQLite commits, each fsync'ed (WAL, synchronous=FULL), one at a time.
//!
//! Run: `cargo run --release --example writer -- [--seconds N]` (bench/writer.sh does it).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use warpbase::storage::{Storage, StorageError};

fn main() -> anyhow::Result<()> {
    let mut seconds = 3.0f64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--seconds" {
            seconds = args.next().and_then(|s| s.parse().ok()).unwrap_or(seconds);
        }
    }
    let dur = Duration::from_secs_f64(seconds);
    let raw = raw_fsync_commits(dur)?;
    println!("{:<28} {:>12} {:>10}", "scenario", "commits/s", "vs raw");
    println!(
        "{:<28} {:>12.0} {:>9.2}x",
        "raw sqlite, 1 per fsync", raw, 1.0
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut json = vec![format!(
        "{{\"scenario\":\"raw\",\"commits_per_sec\":{raw:.0}}}"
    )];
    for callers in [1usize, 8, 64] {
        let (rate, mean_batch) = rt.block_on(writer_commits(callers, dur))?;
        println!(
            "{:<28} {:>12.0} {:>9.2}x   (mean batch {:.1})",
            format!("writer, {callers} callers"),
            rate,
            rate / raw,
            mean_batch
        );
        json.push(format!(
            "{{\"scenario\":\"writer\",\"callers\":{callers},\"commits_per_sec\":{rate:.0},\"mean_batch\":{mean_batch:.2}}}"
        ));
    }
    if let Ok(path) = std::env::var("WARPBASE_BENCH_JSON") {
        std::fs::write(path, format!("[{}]\n", json.join(",")))?;
    }
    Ok(())
}

fn raw_fsync_commits(dur: Duration) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let conn = warpbase::storage::open_writer_conn(&dir.path().join("raw.db"))?;
    conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")?;
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < dur {
        conn.execute("INSERT INTO t (v) VALUES ('x')", [])?;
        n += 1;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

async fn writer_commits(callers: usize, dur: Duration) -> anyhow::Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let storage = {
        let p = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || Storage::open(&p)).await??
    };
    storage
        .write(|c| {
            c.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")?;
            Ok::<_, StorageError>(())
        })
        .await?;
    let before = storage.writer_stats();
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let s = storage.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            while started.elapsed() < dur {
                s.write(|c| {
                    c.execute("INSERT INTO t (v) VALUES ('x')", [])?;
                    Ok::<_, StorageError>(())
                })
                .await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, StorageError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = storage.writer_stats();
    storage.close().await?;
    let writes = (after.writes - before.writes) as f64;
    let txs = (after.transactions - before.transactions).max(1) as f64;
    Ok((done.load(Ordering::Relaxed) as f64 / elapsed, writes / txs))
}

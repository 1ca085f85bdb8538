//! Finding processes by a variable of their environment (`/proc/<pid>/environ`).

/// The processes whose environment holds `key=value` exactly.
pub fn pids_with_env(key: &str, value: &str) -> Vec<i32> {
    let needle = format!("{key}={value}");
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let pid: i32 = e.file_name().to_str()?.parse().ok()?;
                    let env = std::fs::read(e.path().join("environ")).ok()?;
                    env.split(|b| *b == 0)
                        .any(|kv| kv == needle.as_bytes())
                        .then_some(pid)
                })
                .collect()
        })
        .unwrap_or_default()
}

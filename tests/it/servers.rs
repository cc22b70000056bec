//! Real servers for the tests, on localhost, started here and stopped by
//! PID: a throwaway PostgreSQL cluster (`initdb` in a temporary folder,
//! `pg_ctl` on a free port) and a single-node Slurm cluster (`munged`,
//! `slurmctld`, `slurmd` from a generated `slurm.conf`). `.ci/run` installs
//! the Debian packages (`postgresql`, `slurmctld slurmd slurm-client
//! munge`). As root the servers run as their own users where they must.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `cmd` (as `user` when we are root), panicking with its output on
/// failure.
fn run_as(user: Option<&str>, cmd: &[&str]) {
    let mut c = match (user, is_root()) {
        (Some(u), true) => {
            let mut c = Command::new("runuser");
            c.args(["-u", u, "--"]).args(cmd);
            c
        }
        _ => {
            let mut c = Command::new(cmd[0]);
            c.args(&cmd[1..]);
            c
        }
    };
    let o = c.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn pid_in(file: &Path) -> Option<i32> {
    std::fs::read_to_string(file)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Sends `sig` to `pid` and waits until it is gone.
fn stop_pid(pid: i32, sig: i32) {
    // SAFETY: kill only sends a signal.
    unsafe { libc::kill(pid, sig) };
    let t = Instant::now();
    // SAFETY: signal 0 only checks that the process exists.
    while unsafe { libc::kill(pid, 0) } == 0 && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A PostgreSQL cluster for one test.
pub struct Postgres {
    dir: tempfile::TempDir,
    pub port: u16,
}

fn pg_bin(name: &str) -> String {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap_or_else(|_| {
            panic!(
                "PostgreSQL is not installed (apt-get install postgresql): no {}",
                root.display()
            )
        })
        .flatten()
        .map(|e| e.path())
        .collect();
    versions.sort();
    versions
        .last()
        .expect("a PostgreSQL version")
        .join("bin")
        .join(name)
        .display()
        .to_string()
}

impl Postgres {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        if is_root() {
            run_as(None, &["chown", "postgres", dir.path().to_str().unwrap()]);
        }
        let user = Some("postgres");
        run_as(
            user,
            &[
                &pg_bin("initdb"),
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "hmsa",
                "--no-sync",
            ],
        );
        let port = free_port();
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            dir.path().display()
        );
        let log = dir.path().join("log");
        run_as(
            user,
            &[
                &pg_bin("pg_ctl"),
                "-D",
                data.to_str().unwrap(),
                "-o",
                &opts,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ],
        );
        Postgres { dir, port }
    }

    /// A new empty database on this cluster, as a URL.
    pub fn database(&self, name: &str) -> String {
        let o = Command::new(pg_bin("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "hmsa",
                "-d",
                "postgres",
                "-c",
            ])
            .arg(format!("CREATE DATABASE {name}"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        format!("postgres://hmsa@127.0.0.1:{}/{name}", self.port)
    }

    /// Runs SQL on database `name` through psql, returning its unaligned output.
    pub fn psql(&self, name: &str, sql: &str) -> String {
        self.try_psql(name, sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// As [`Self::psql`], an error instead of a panic (e.g. before the
    /// tables exist).
    pub fn try_psql(&self, name: &str, sql: &str) -> Result<String, String> {
        let o = Command::new(pg_bin("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "hmsa",
                "-d",
                name,
                "-At",
                "-c",
                sql,
            ])
            .output()
            .unwrap();
        if !o.status.success() {
            return Err(String::from_utf8_lossy(&o.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // the postmaster's PID is the first line of postmaster.pid; SIGQUIT
        // is PostgreSQL's immediate shutdown
        if let Some(pid) = pid_in(&self.dir.path().join("data/postmaster.pid")) {
            stop_pid(pid, libc::SIGQUIT);
        }
    }
}

/// A single-node Slurm cluster on localhost for one test.
pub struct Slurm {
    dir: tempfile::TempDir,
    pub conf: PathBuf,
    pids: Vec<PathBuf>,
}

fn hostname() -> String {
    let o = Command::new("hostname").arg("-s").output().unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

impl Slurm {
    pub fn start() -> Self {
        assert!(
            Path::new("/usr/sbin/slurmctld").exists() && Path::new("/usr/sbin/munged").exists(),
            "Slurm is not installed (apt-get install slurmctld slurmd slurm-client munge)"
        );
        assert!(is_root(), "the Slurm test starts slurmd, which needs root");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        for sub in ["state", "spool", "munge"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        // munged: its own key and socket, run as root with --force
        let key = d.join("munge/munge.key");
        std::fs::write(&key, (0..1024).map(|i| (i * 7 % 251) as u8).collect::<Vec<_>>()).unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o400)).unwrap();
        let sock = d.join("munge/munge.sock");
        run_as(
            None,
            &[
                "/usr/sbin/munged",
                "--force",
                "--key-file",
                key.to_str().unwrap(),
                "--socket",
                sock.to_str().unwrap(),
                "--pid-file",
                d.join("munge/munged.pid").to_str().unwrap(),
                "--log-file",
                d.join("munge/munged.log").to_str().unwrap(),
                "--seed-file",
                d.join("munge/munged.seed").to_str().unwrap(),
            ],
        );
        let host = hostname();
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let conf = d.join("slurm.conf");
        std::fs::write(
            &conf,
            format!(
                "ClusterName=hmsa\nSlurmctldHost={host}\nSlurmUser=root\nSlurmdUser=root\n\
                 AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={sock}\n\
                 SlurmctldPort={}\nSlurmdPort={}\nStateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool\n\
                 SlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd.pid\n\
                 SlurmctldLogFile={d}/slurmctld.log\nSlurmdLogFile={d}/slurmd.log\n\
                 ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nMpiDefault=none\n\
                 JobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none\n\
                 SchedulerType=sched/builtin\nSelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\n\
                 ReturnToService=2\nSlurmctldTimeout=30\nSlurmdTimeout=30\nInactiveLimit=0\nKillWait=5\n\
                 NodeName={host} CPUs={cpus} State=UNKNOWN\n\
                 PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE\n",
                free_port(),
                free_port(),
                sock = sock.display(),
                d = d.display(),
            ),
        )
        .unwrap();
        let envs = [("SLURM_CONF", conf.to_str().unwrap())];
        for (bin, args) in [
            ("/usr/sbin/slurmctld", vec!["-c", "-i"]),
            ("/usr/sbin/slurmd", vec![]),
        ] {
            let o = Command::new(bin)
                .args(&args)
                .envs(envs)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{bin}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let s = Slurm {
            pids: vec![
                d.join("slurmd.pid"),
                d.join("slurmctld.pid"),
                d.join("munge/munged.pid"),
            ],
            conf,
            dir,
        };
        // wait for the node to be idle
        let t = Instant::now();
        loop {
            let o = s.cmd("sinfo").args(["-h", "-o", "%t"]).output().unwrap();
            let st = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if st == "idle" {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the node never became idle ({st}): {}",
                std::fs::read_to_string(s.dir.path().join("slurmctld.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        s
    }

    /// A Slurm client command pointed at this cluster.
    pub fn cmd(&self, name: &str) -> Command {
        let mut c = Command::new(name);
        c.env("SLURM_CONF", &self.conf);
        c
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        let _ = self.cmd("scancel").args(["--user", "root"]).output();
        for p in &self.pids {
            if let Some(pid) = pid_in(p) {
                stop_pid(pid, libc::SIGTERM);
            }
        }
    }
}

/// An `mlflow server` (PyPI `mlflow`) with a SQLite backend and served
/// artifacts in a temporary folder, on a free localhost port.
pub struct Mlflow {
    _dir: tempfile::TempDir,
    child: std::process::Child,
    pub uri: String,
}

fn mlflow_bin() -> PathBuf {
    if let Ok(p) = std::env::var("HMSA_MLFLOW") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/mlflow-venv/bin/mlflow");
    if venv.exists() {
        return venv;
    }
    "mlflow".into()
}

impl Mlflow {
    pub fn start() -> Self {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new(mlflow_bin())
            .args([
                "server",
                "--backend-store-uri",
                &format!("sqlite:///{}", dir.path().join("mlflow.db").display()),
                "--artifacts-destination",
                dir.path().join("artifacts").to_str().unwrap(),
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "mlflow: {e} (.ci/run installs it into target/mlflow-venv; or pip install mlflow, or set HMSA_MLFLOW)"
                )
            });
        let uri = format!("http://127.0.0.1:{port}");
        let t = Instant::now();
        while ureq::get(&format!("{uri}/health")).call().is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "mlflow server did not start: {}",
                std::fs::read_to_string(dir.path().join("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        Mlflow {
            _dir: dir,
            child,
            uri,
        }
    }
}

impl Drop for Mlflow {
    fn drop(&mut self) {
        // the server and the workers it starts share its process group
        let pg = self.child.id() as i32;
        // SAFETY: kill only sends signals.
        unsafe { libc::kill(-pg, libc::SIGTERM) };
        let t = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(15) {
            std::thread::sleep(Duration::from_millis(100));
        }
        // SAFETY: as above.
        unsafe { libc::kill(-pg, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

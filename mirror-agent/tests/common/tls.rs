//! TLS pieces for the tests: certificates made by `openssl` in a temporary directory, and
//! Debian's nginx (linked with OpenSSL 3) run with the test's server blocks.

use super::*;

/// A test CA, a server certificate it signed (for `pod`, `localhost` and 127.0.0.1) and a
/// client certificate it signed, as PEM files in a directory removed on drop.
pub struct Certs {
    pub dir: tempfile::TempDir,
}

impl Certs {
    pub fn make() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let at = |f: &str| dir.path().join(f).display().to_string();
        sh(&[
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=test-ca",
            "-days",
            "2",
            "-keyout",
            &at("ca.key"),
            "-out",
            &at("ca.pem"),
        ]);
        std::fs::write(
            at("server.ext"),
            "subjectAltName=DNS:pod,DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        std::fs::write(at("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for who in ["server", "client"] {
            sh(&[
                "openssl",
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={who}"),
                "-keyout",
                &at(&format!("{who}.key")),
                "-out",
                &at(&format!("{who}.csr")),
            ]);
            sh(&[
                "openssl",
                "x509",
                "-req",
                "-in",
                &at(&format!("{who}.csr")),
                "-CA",
                &at("ca.pem"),
                "-CAkey",
                &at("ca.key"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &at(&format!("{who}.ext")),
                "-out",
                &at(&format!("{who}.pem")),
            ]);
        }
        Certs { dir }
    }

    /// The path of one of its files: `ca.pem`, `server.pem`, `server.key`, `client.pem`,
    /// `client.key`.
    pub fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }
}

/// nginx with one worker inside `ns`, serving `servers` (server blocks); stopped on drop.
pub struct Nginx {
    _proc: Proc,
    _dir: tempfile::TempDir,
}

impl Nginx {
    pub fn start(ns: &Netns, servers: &str) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let conf = format!(
            "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
             {servers}\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let proc = Proc::spawn(
            ns.exec(&["nginx", "-c", &format!("{d}/nginx.conf"), "-p", &d])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        Nginx {
            _proc: proc,
            _dir: dir,
        }
    }
}

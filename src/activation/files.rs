//! Activation files: which well-known names can be started on demand, and how.
//!
//! Two formats are read from each activation directory:
//!
//! - our own `*.toml` files (`name`, `exec`, optional `environment`,
//!   `working_directory`, `start_timeout_ms`, `leftovers`; any other key is
//!   an error);
//! - the standard `*.service` files with a `[D-BUS Service]` section, parsed
//!   the way dbus-daemon parses them (`bus/desktop-file.c`), with `Exec`
//!   split by a port of its `_dbus_shell_parse_argv`, and broker's own
//!   `X-Broker-Leftovers=` key.
//!
//! Loading never fails as a whole: a broken file is skipped with one
//! [`LoadWarning`] and every other file still loads. The first definition of
//! a name wins, in directory order, then file-name order within a directory.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use tracing::debug;
use zbus::names::WellKnownName;

/// One activatable name and the command that provides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceFile {
    /// The well-known bus name the service will own.
    pub name: String,
    /// The argv to execute; `exec[0]` is never empty. From TOML files it is
    /// absolute; from `.service` files it is used as written (no PATH search).
    pub exec: Vec<String>,
    /// Variables to add to the service's environment (TOML files only).
    pub environment: Vec<(String, String)>,
    /// Directory to start the service in (TOML files only).
    pub working_directory: Option<PathBuf>,
    /// Per-service start timeout overriding the global one (TOML files only).
    pub start_timeout: Option<Duration>,
    /// `User=` of a `.service` file; meaningful on a system bus only.
    pub user: Option<String>,
    /// `SystemdService=` of a `.service` file.
    pub systemd_service: Option<String>,
    /// What happens to the service's other processes when the process that owns its name
    /// dies (`leftovers` in TOML, `X-Broker-Leftovers=` in `.service` files).
    pub leftovers: Leftovers,
    /// The file this definition was read from.
    pub source: PathBuf,
}

/// What becomes of a service's remaining processes (helpers, forked children) when the
/// process that owns its name dies. Stopping them is the default, so that a crashed service
/// leaves nothing behind and its next start begins from a clean slate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Leftovers {
    /// SIGTERM, then SIGKILL after the stop grace (`"stop"`).
    #[default]
    Stop,
    /// Leave them running (`"keep"`); they are still stopped when the bus stops.
    Keep,
}

impl Leftovers {
    /// Parses the value as written in either file format; the error names the value.
    pub fn parse(value: &str) -> Result<Leftovers, String> {
        match value {
            "stop" => Ok(Leftovers::Stop),
            "keep" => Ok(Leftovers::Keep),
            other => Err(format!(
                "leftovers must be \"stop\" or \"keep\", not {other:?}"
            )),
        }
    }
}

/// The result of scanning the activation directories.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Every loaded service, by bus name.
    pub services: BTreeMap<String, ServiceFile>,
    /// One entry per file (or directory) that could not be used; the caller
    /// logs them.
    pub warnings: Vec<LoadWarning>,
}

/// Why one activation file (or an unreadable directory) was skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadWarning {
    pub path: PathBuf,
    /// 1-based line of the problem, where one can be named.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for LoadWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.path.display(), self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

/// The session bus's service directories, in the reference implementation's
/// order: `$XDG_RUNTIME_DIR/dbus-1/services`, `$XDG_DATA_HOME/dbus-1/services`
/// (default `$HOME/.local/share`), each of `$XDG_DATA_DIRS` (default
/// `/usr/local/share:/usr/share`), and finally dbus-daemon's own data
/// directory `/usr/share`, which it always appends.
///
/// `env` looks up an environment variable (pass `|k| std::env::var(k).ok()`).
/// Empty variables count as unset and relative entries are ignored, as the
/// XDG base directory specification asks; duplicates keep their first place.
pub fn session_dirs(env: impl Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let var = |key: &str| env(key).filter(|value| !value.is_empty());
    let mut bases: Vec<PathBuf> = Vec::new();
    bases.extend(var("XDG_RUNTIME_DIR").map(PathBuf::from));
    match var("XDG_DATA_HOME") {
        Some(data_home) => bases.push(data_home.into()),
        None => bases.extend(var("HOME").map(|home| Path::new(&home).join(".local/share"))),
    }
    let data_dirs = var("XDG_DATA_DIRS").unwrap_or_else(|| "/usr/local/share:/usr/share".into());
    bases.extend(data_dirs.split(':').map(PathBuf::from));
    bases.push("/usr/share".into());

    let mut dirs: Vec<PathBuf> = Vec::new();
    for base in bases.into_iter().filter(|base| base.is_absolute()) {
        let dir = base.join("dbus-1/services");
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    dirs
}

/// Reads every `*.toml` and `*.service` file of `dirs`. Missing directories
/// are skipped silently; anything else that goes wrong becomes a warning.
pub fn load(dirs: &[PathBuf]) -> Loaded {
    let mut loaded = Loaded::default();
    for dir in dirs {
        load_dir(dir, &mut loaded);
    }
    loaded
}

/// dbus-daemon refuses service files larger than this; so do we, for both
/// formats, so a stray huge file cannot eat memory.
const MAX_FILE_SIZE: u64 = 128 * 1024;

/// The problem found in one file, before its path is attached.
#[derive(Debug)]
struct FileError {
    line: Option<usize>,
    message: String,
}

impl FileError {
    fn new(line: Option<usize>, message: impl Into<String>) -> Self {
        FileError {
            line,
            message: message.into(),
        }
    }
}

/// The two file kinds, told apart by extension.
#[derive(Debug, Clone, Copy)]
enum Format {
    Toml,
    DbusService,
}

impl Format {
    fn of(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()? {
            "toml" => Some(Format::Toml),
            "service" => Some(Format::DbusService),
            _ => None,
        }
    }
}

fn load_dir(dir: &Path, loaded: &mut Loaded) {
    let mut files = match list_files(dir) {
        Ok(files) => files,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return,
        Err(err) => {
            loaded.warnings.push(LoadWarning {
                path: dir.to_owned(),
                line: None,
                message: format!("cannot read activation directory: {err}"),
            });
            return;
        }
    };
    files.sort();
    for (path, format) in files
        .into_iter()
        .filter_map(|path| Format::of(&path).map(|format| (path, format)))
    {
        if !path.is_file() {
            continue;
        }
        match load_file(&path, format) {
            Ok(service) => insert_first(loaded, service),
            Err(err) => loaded.warnings.push(LoadWarning {
                path,
                line: err.line,
                message: err.message,
            }),
        }
    }
}

fn list_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::read_dir(dir)?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect()
}

/// Keeps the first definition of a name; later ones are only noted.
fn insert_first(loaded: &mut Loaded, service: ServiceFile) {
    match loaded.services.get(&service.name) {
        Some(first) => debug!(
            name = %service.name,
            ignored = %service.source.display(),
            used = %first.source.display(),
            "activatable name defined twice; the first definition wins"
        ),
        None => {
            loaded.services.insert(service.name.clone(), service);
        }
    }
}

/// Parses `text` as the activation file `path` (`.toml` or `.service`, by its extension) would
/// be read by [`load`], without touching the disk. The fuzzing harness (tests/fuzz.rs) feeds it
/// mutated files this way.
pub fn parse_text(path: &Path, text: &str) -> Result<ServiceFile, LoadWarning> {
    let warning = |err: FileError| LoadWarning {
        path: path.to_owned(),
        line: err.line,
        message: err.message,
    };
    let format = Format::of(path)
        .ok_or_else(|| warning(FileError::new(None, "neither a .toml nor a .service file")))?;
    parse_as(path, format, text).map_err(warning)
}

fn load_file(path: &Path, format: Format) -> Result<ServiceFile, FileError> {
    parse_as(path, format, &read_text(path)?)
}

/// The service that `text`, the contents of `path`, defines in `format`.
fn parse_as(path: &Path, format: Format, text: &str) -> Result<ServiceFile, FileError> {
    let mut service = match format {
        Format::Toml => parse_toml(text, path)?,
        Format::DbusService => parse_dbus_service(text)?,
    };
    service.source = path.to_owned();
    Ok(service)
}

fn read_text(path: &Path) -> Result<String, FileError> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_FILE_SIZE + 1).read_to_end(&mut bytes))
        .map_err(|err| FileError::new(None, format!("cannot read: {err}")))?;
    if bytes.len() as u64 > MAX_FILE_SIZE {
        return Err(FileError::new(
            None,
            format!("file is larger than {MAX_FILE_SIZE} bytes"),
        ));
    }
    String::from_utf8(bytes).map_err(|_| FileError::new(None, "invalid UTF-8"))
}

fn check_bus_name(name: &str, line: Option<usize>) -> Result<(), FileError> {
    WellKnownName::try_from(name)
        .map(drop)
        .map_err(|err| FileError::new(line, format!("invalid well-known bus name {name:?}: {err}")))
}

/// 1-based line of a byte offset in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let before = text.get(..offset).unwrap_or(text);
    before.matches('\n').count() + 1
}

// ---------------------------------------------------------------------------
// Our TOML format.

/// The TOML file as written. Values are `Spanned` so that a bad value can be
/// reported at its line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlService {
    name: Spanned<String>,
    exec: Spanned<Vec<String>>,
    environment: Option<Spanned<BTreeMap<String, String>>>,
    working_directory: Option<Spanned<PathBuf>>,
    start_timeout_ms: Option<Spanned<u64>>,
    leftovers: Option<Spanned<String>>,
}

fn parse_toml(text: &str, path: &Path) -> Result<ServiceFile, FileError> {
    let raw: TomlService = toml::from_str(text).map_err(|err| {
        // A missing key comes with the empty span 0..0: no line to name.
        let line = err
            .span()
            .filter(|span| span.end > 0)
            .map(|span| line_of(text, span.start));
        FileError::new(line, err.message().trim_end().to_owned())
    })?;
    let at = |span: std::ops::Range<usize>| Some(line_of(text, span.start));
    // Relative paths in the file are relative to the file's own directory.
    let base = std::path::absolute(path.parent().unwrap_or(Path::new("."))).map_err(|err| {
        FileError::new(None, format!("cannot resolve the file's directory: {err}"))
    })?;

    check_bus_name(raw.name.get_ref(), at(raw.name.span()))?;
    let exec_line = at(raw.exec.span());
    let exec = toml_exec(raw.exec.into_inner(), &base, exec_line)?;
    let environment = match raw.environment {
        Some(env) => toml_environment(at(env.span()), env.into_inner())?,
        None => Vec::new(),
    };
    let start_timeout = match raw.start_timeout_ms {
        Some(ms) if *ms.get_ref() == 0 => {
            return Err(FileError::new(
                at(ms.span()),
                "start_timeout_ms must be positive",
            ));
        }
        Some(ms) => Some(Duration::from_millis(ms.into_inner())),
        None => None,
    };
    let leftovers = match raw.leftovers {
        Some(value) => Leftovers::parse(value.get_ref())
            .map_err(|message| FileError::new(at(value.span()), message))?,
        None => Leftovers::default(),
    };
    Ok(ServiceFile {
        name: raw.name.into_inner(),
        exec,
        environment,
        working_directory: raw.working_directory.map(|dir| base.join(dir.into_inner())),
        start_timeout,
        user: None,
        systemd_service: None,
        leftovers,
        source: PathBuf::new(),
    })
}

/// Checks `exec` and makes its program absolute against `base`.
fn toml_exec(
    mut exec: Vec<String>,
    base: &Path,
    line: Option<usize>,
) -> Result<Vec<String>, FileError> {
    if exec.first().is_none_or(String::is_empty) {
        return Err(FileError::new(line, "exec must start with a program"));
    }
    if exec.iter().any(|arg| arg.contains('\0')) {
        return Err(FileError::new(line, "exec: arguments cannot contain NUL"));
    }
    if let Some(program) = exec.first_mut()
        && Path::new(program.as_str()).is_relative()
    {
        *program = base
            .join(program.as_str())
            .into_os_string()
            .into_string()
            .map_err(|_| FileError::new(line, "exec: the resolved program path is not UTF-8"))?;
    }
    Ok(exec)
}

fn toml_environment(
    line: Option<usize>,
    env: BTreeMap<String, String>,
) -> Result<Vec<(String, String)>, FileError> {
    for (key, value) in &env {
        if key.is_empty() || key.contains(['=', '\0']) {
            return Err(FileError::new(
                line,
                format!("environment: invalid variable name {key:?}"),
            ));
        }
        if value.contains('\0') {
            return Err(FileError::new(
                line,
                format!("environment: {key} contains NUL"),
            ));
        }
    }
    Ok(env.into_iter().collect())
}

// ---------------------------------------------------------------------------
// Standard `.service` files.

const SERVICE_SECTION: &str = "D-BUS Service";

/// A `key=value` line, with the value already unescaped.
struct Entry {
    key: String,
    value: String,
    line: usize,
}

struct Section {
    name: String,
    entries: Vec<Entry>,
}

fn parse_dbus_service(text: &str) -> Result<ServiceFile, FileError> {
    let sections = parse_desktop_entries(text)?;
    // As dbus-daemon: the first section of that name and the first
    // occurrence of a key count; everything else is ignored.
    let section = sections
        .iter()
        .find(|section| section.name == SERVICE_SECTION);
    let get = |key: &str| {
        section.and_then(|section| section.entries.iter().find(|entry| entry.key == key))
    };
    let required = |key: &str| {
        get(key)
            .ok_or_else(|| FileError::new(None, format!("no \"{key}\" key in [{SERVICE_SECTION}]")))
    };
    let optional = |key: &str| get(key).map(|e| e.value.clone()).filter(|v| !v.is_empty());

    let name = required("Name")?;
    check_bus_name(&name.value, Some(name.line))?;
    let exec = required("Exec")?;
    let argv = split_exec(&exec.value)
        .map_err(|message| FileError::new(Some(exec.line), format!("Exec: {message}")))?;
    let leftovers = match get("X-Broker-Leftovers") {
        Some(entry) => Leftovers::parse(&entry.value).map_err(|message| {
            FileError::new(Some(entry.line), format!("X-Broker-Leftovers: {message}"))
        })?,
        None => Leftovers::default(),
    };
    Ok(ServiceFile {
        name: name.value.clone(),
        exec: argv,
        environment: Vec::new(),
        working_directory: None,
        start_timeout: None,
        user: optional("User"),
        systemd_service: optional("SystemdService"),
        leftovers,
        source: PathBuf::new(),
    })
}

/// Parses a desktop-entry style file exactly as strictly as dbus-daemon:
/// a syntax error anywhere, in any section, rejects the file.
fn parse_desktop_entries(text: &str) -> Result<Vec<Section>, FileError> {
    let mut sections: Vec<Section> = Vec::new();
    for (index, line) in lines(text).enumerate() {
        let number = index + 1;
        let error = |message: &str| FileError::new(Some(number), message);
        if line.starts_with('[') {
            sections.push(Section {
                name: parse_section_header(line).map_err(&error)?,
                entries: Vec::new(),
            });
        } else if line.starts_with('#')
            || line
                .chars()
                .all(|c| matches!(c, ' ' | '\t' | '\r' | '\x0c'))
        {
            continue;
        } else if let Some(section) = sections.last_mut() {
            if let Some((key, value)) = parse_key_value(line).map_err(&error)? {
                section.entries.push(Entry {
                    key,
                    value,
                    line: number,
                });
            }
        } else {
            return Err(error("key=value before any [section]"));
        }
    }
    Ok(sections)
}

/// Splits on `\r\n`, `\r` or `\n`, like dbus's `_dbus_string_find_eol`.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let current = rest?;
        match current.find(['\r', '\n']) {
            Some(end) => {
                let eol = if current[end..].starts_with("\r\n") {
                    2
                } else {
                    1
                };
                let next = &current[end + eol..];
                rest = (!next.is_empty()).then_some(next);
                Some(&current[..end])
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

fn parse_section_header(line: &str) -> Result<String, &'static str> {
    let inner = line
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .filter(|inner| !inner.is_empty())
        .ok_or("invalid syntax for section header")?;
    let name = unescape(inner)?;
    if name
        .chars()
        .any(|c| !(' '..='~').contains(&c) || c == '[' || c == ']')
    {
        return Err("invalid characters in section name");
    }
    Ok(name)
}

/// `Key = value` → `(Key, value)`; localized keys (`Key[xx]=`) are skipped
/// (`None`), as dbus-daemon does.
fn parse_key_value(line: &str) -> Result<Option<(String, String)>, &'static str> {
    let key_len = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .unwrap_or(line.len());
    let (key, rest) = line.split_at(key_len);
    if key.is_empty() {
        return Err("empty key name");
    }
    if rest.starts_with('[') {
        return Ok(None);
    }
    let rest = rest.trim_start_matches(' ');
    let value = match rest.strip_prefix('=') {
        Some(value) => value.trim_start_matches(' '),
        None if rest.is_empty() => return Err("no '=' in key/value pair"),
        None => return Err("invalid characters in key name"),
    };
    Ok(Some((key.to_owned(), unescape(value)?)))
}

/// Desktop-entry unescaping: `\s \n \t \r \\`; any other escape is an error.
fn unescape(value: &str) -> Result<String, &'static str> {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\0' => return Err("embedded NUL in value"),
            '\\' => out.push(match chars.next() {
                Some('s') => ' ',
                Some('n') => '\n',
                Some('t') => '\t',
                Some('r') => '\r',
                Some('\\') => '\\',
                Some(_) => return Err("invalid escape sequence"),
                None => return Err("value ends in a backslash"),
            }),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Splits a command line like dbus-daemon's `_dbus_shell_parse_argv`: blanks
/// and newlines separate words; single quotes are literal; double quotes
/// allow `\` before `$ ` " \` and newline; a backslash outside quotes escapes
/// any character; an unquoted `#` discards the rest of the line; nothing is
/// expanded.
///
/// One deliberate difference: the reference turns a trailing blank (or an
/// empty line) into an extra empty argument; here, as in POSIX and GLib,
/// only words that contain something (if only `''`) become arguments.
fn split_exec(command: &str) -> Result<Vec<String>, &'static str> {
    let argv: Vec<String> = tokenize(command)?
        .iter()
        .map(|word| unquote(word))
        .collect();
    if argv.first().is_none_or(String::is_empty) {
        return Err("no program given");
    }
    Ok(argv)
}

/// The tokenizer of `dbus-shell.c`: splits into words that still carry
/// their quotes and backslashes, checking that every quote is closed.
fn tokenize(command: &str) -> Result<Vec<String>, &'static str> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    // True after an odd run of backslashes: the next `"` is escaped.
    let mut escaping = false;
    let mut chars = command.chars();
    while let Some(mut c) = chars.next() {
        match quote {
            Some('\\') => {
                if c != '\n' {
                    word.push('\\');
                    word.push(c);
                }
                quote = None;
            }
            Some('#') => {
                // A comment runs to the newline, which it swallows without
                // ending the word (the reference's behaviour).
                while c != '\n' {
                    match chars.next() {
                        Some(next) => c = next,
                        None => return finish(words, word, None),
                    }
                }
                quote = None;
            }
            Some(open) => {
                if c == open && !(open == '"' && escaping) {
                    quote = None;
                }
                word.push(c);
            }
            None => match c {
                '\n' | ' ' | '\t' => end_word(&mut words, &mut word),
                '\'' | '"' => {
                    word.push(c);
                    quote = Some(c);
                }
                '#' | '\\' => quote = Some(c),
                c => word.push(c),
            },
        }
        escaping = c == '\\' && !escaping;
    }
    finish(words, word, quote)
}

fn end_word(words: &mut Vec<String>, word: &mut String) {
    if !word.is_empty() {
        words.push(std::mem::take(word));
    }
}

fn finish(
    mut words: Vec<String>,
    mut word: String,
    quote: Option<char>,
) -> Result<Vec<String>, &'static str> {
    if quote.is_some() {
        return Err("unclosed quotes in command line");
    }
    end_word(&mut words, &mut word);
    Ok(words)
}

/// `_dbus_shell_unquote`: removes the quotes and backslashes of one word.
/// The word comes from [`tokenize`], so its quotes are balanced.
fn unquote(word: &str) -> String {
    let mut out = String::with_capacity(word.len());
    let mut chars = word.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next().filter(|&next| next != '\n') {
                    out.push(next);
                }
            }
            '\'' => out.extend(chars.by_ref().take_while(|&next| next != '\'')),
            '"' => {
                while let Some(next) = chars.next() {
                    match next {
                        '"' => break,
                        '\\' => match chars.peek() {
                            Some(&escaped @ ('"' | '\\' | '`' | '$' | '\n')) => {
                                out.push(escaped);
                                chars.next();
                            }
                            _ => out.push('\\'),
                        },
                        other => out.push(other),
                    }
                }
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use tempfile::TempDir;

    fn write(dir: &Path, file: &str, text: &str) -> PathBuf {
        let path = dir.join(file);
        fs::write(&path, text).expect("write test file");
        path
    }

    /// Loads one file alone and returns its service or its single warning.
    fn load_one(file: &str, text: &str) -> (TempDir, Result<ServiceFile, LoadWarning>) {
        let dir = TempDir::new().expect("tempdir");
        write(dir.path(), file, text);
        let mut loaded = load(&[dir.path().to_owned()]);
        let result = match (loaded.services.pop_first(), loaded.warnings.pop()) {
            (Some((_, service)), None) => Ok(service),
            (None, Some(warning)) => Err(warning),
            other => panic!("expected one service or one warning, got {other:?}"),
        };
        (dir, result)
    }

    fn warning(file: &str, text: &str) -> LoadWarning {
        match load_one(file, text).1 {
            Err(warning) => warning,
            Ok(service) => panic!("expected a warning, loaded {service:?}"),
        }
    }

    #[test]
    fn toml_file_with_every_key() {
        let text = r#"
name = "org.example.Echo"
exec = ["/usr/bin/echo-service", "--verbose"]
working_directory = "/srv"
start_timeout_ms = 1500
leftovers = "keep"

[environment]
RUST_LOG = "debug"
LANG = "C"
"#;
        let (dir, service) = load_one("echo.toml", text);
        let service = service.expect("loads");
        assert_eq!(
            service,
            ServiceFile {
                name: "org.example.Echo".into(),
                exec: vec!["/usr/bin/echo-service".into(), "--verbose".into()],
                environment: vec![
                    ("LANG".into(), "C".into()),
                    ("RUST_LOG".into(), "debug".into())
                ],
                working_directory: Some("/srv".into()),
                start_timeout: Some(Duration::from_millis(1500)),
                user: None,
                systemd_service: None,
                leftovers: Leftovers::Keep,
                source: dir.path().join("echo.toml"),
            }
        );
    }

    #[test]
    fn toml_relative_paths_resolve_against_the_files_directory() {
        let text = "name = \"org.example.Rel\"\nexec = [\"bin/svc\", \"data/arg\"]\nworking_directory = \"run\"\n";
        let (dir, service) = load_one("rel.toml", text);
        let service = service.expect("loads");
        let base = std::path::absolute(dir.path()).expect("absolute");
        assert_eq!(
            service.exec[0],
            base.join("bin/svc").to_str().expect("utf-8")
        );
        assert_eq!(service.exec[1], "data/arg", "only the program is resolved");
        assert_eq!(service.working_directory, Some(base.join("run")));
        assert!(Path::new(&service.exec[0]).is_absolute());
    }

    #[test]
    fn toml_syntax_error_names_its_line() {
        let w = warning(
            "bad.toml",
            "name = \"org.example.Bad\"\n\nexec = [\"/bin/true\"\n",
        );
        assert_eq!(w.line, Some(3), "{w}");
    }

    #[test]
    fn toml_missing_key_is_an_error() {
        let w = warning("nokey.toml", "name = \"org.example.NoExec\"\n");
        assert!(w.message.contains("exec"), "{w}");
        assert_eq!(w.line, None, "{w}");
        let w = warning("noname.toml", "exec = [\"/bin/true\"]\n");
        assert!(w.message.contains("name"), "{w}");
    }

    #[test]
    fn toml_unknown_key_is_an_error_at_its_line() {
        let w = warning(
            "extra.toml",
            "name = \"org.example.X\"\nexec = [\"/bin/true\"]\ncolour = \"red\"\n",
        );
        assert_eq!(w.line, Some(3), "{w}");
        assert!(w.message.contains("colour"), "{w}");
    }

    #[test]
    fn toml_bad_values_are_errors_at_their_line() {
        let cases = [
            (
                "name = \"not a name\"\nexec = [\"/bin/true\"]\n",
                1,
                "bus name",
            ),
            ("name = \"org.example.E\"\nexec = []\n", 2, "exec"),
            ("name = \"org.example.E\"\nexec = [\"\"]\n", 2, "exec"),
            (
                "name = \"org.example.E\"\nexec = [\"/bin/true\"]\nstart_timeout_ms = 0\n",
                3,
                "start_timeout_ms",
            ),
            (
                "name = \"org.example.E\"\nexec = [\"/bin/true\"]\nstart_timeout_ms = -5\n",
                3,
                "",
            ),
            (
                "name = \"org.example.E\"\nexec = [\"/bin/true\"]\nenvironment = { \"A=B\" = \"x\" }\n",
                3,
                "A=B",
            ),
            (
                "name = \"org.example.E\"\nexec = [\"/bin/true\"]\nenvironment = { A = 1 }\n",
                3,
                "",
            ),
        ];
        for (text, line, needle) in cases {
            let w = warning("e.toml", text);
            assert_eq!(w.line, Some(line), "{text:?}: {w}");
            assert!(w.message.contains(needle), "{text:?}: {w}");
        }
    }

    #[test]
    fn service_file_keys() {
        let text = "# comment\n[D-BUS Service]\nName=org.example.Svc\nExec=/usr/lib/svc --flag\nUser=nobody\nSystemdService=svc.service\nAssumedAppArmorLabel=x\n";
        let (dir, service) = load_one("whatever.service", text);
        assert_eq!(
            service.expect("loads"),
            ServiceFile {
                name: "org.example.Svc".into(),
                exec: vec!["/usr/lib/svc".into(), "--flag".into()],
                environment: Vec::new(),
                working_directory: None,
                start_timeout: None,
                user: Some("nobody".into()),
                systemd_service: Some("svc.service".into()),
                leftovers: Leftovers::Stop,
                source: dir.path().join("whatever.service"),
            }
        );
    }

    #[test]
    fn leftovers_policy_in_both_formats() {
        let toml = |value: &str| {
            let text =
                format!("name = \"org.example.L\"\nexec = [\"/bin/l\"]\nleftovers = {value}\n");
            load_one("l.toml", &text).1
        };
        assert_eq!(toml("\"stop\"").expect("loads").leftovers, Leftovers::Stop);
        assert_eq!(toml("\"keep\"").expect("loads").leftovers, Leftovers::Keep);
        for bad in ["\"Keep\"", "\"\"", "\"kill\""] {
            let w = toml(bad).expect_err(bad);
            assert_eq!(w.line, Some(3), "{bad}: {w}");
            assert!(w.message.contains("leftovers"), "{bad}: {w}");
        }
        let w = toml("1").expect_err("a number");
        assert_eq!(w.line, Some(3), "{w}");

        let service = |value: &str| {
            let text = format!(
                "[D-BUS Service]\nName=org.example.L\nExec=/bin/l\nX-Broker-Leftovers={value}\n"
            );
            load_one("l.service", &text).1
        };
        assert_eq!(service("keep").expect("loads").leftovers, Leftovers::Keep);
        assert_eq!(service("stop").expect("loads").leftovers, Leftovers::Stop);
        let w = service("forever").expect_err("bad value");
        assert_eq!(w.line, Some(4), "{w}");
        assert!(
            w.message.contains("X-Broker-Leftovers") && w.message.contains("forever"),
            "{w}"
        );
        // Outside [D-BUS Service] the key is not broker's, as dbus-daemon ignores other sections.
        let text =
            "[D-BUS Service]\nName=org.example.L\nExec=/bin/l\n[Other]\nX-Broker-Leftovers=bad\n";
        assert_eq!(
            load_one("o.service", text).1.expect("loads").leftovers,
            Leftovers::Stop
        );
    }

    #[test]
    fn service_file_follows_dbus_daemon_lookup_rules() {
        // First key and first section win; other sections, localized keys,
        // spaces around '=' and CRLF line ends are all accepted.
        let text = "[Other]\nName=org.example.Wrong\r\n[D-BUS Service]\r\nName = org.example.First\r\nName=org.example.Second\r\nExec[de]=/wrong\r\nExec=/bin/first\r\n\r\n[D-BUS Service]\r\nExec=/bin/second\r\n";
        let service = load_one("dup.service", text).1.expect("loads");
        assert_eq!(service.name, "org.example.First");
        assert_eq!(service.exec, ["/bin/first"]);
        assert_eq!(service.user, None);
    }

    #[test]
    fn service_file_errors() {
        let cases = [
            ("[D-BUS Service]\nExec=/bin/true\n", None, "Name"),
            ("[D-BUS Service]\nName=org.example.A\n", None, "Exec"),
            (
                "[Other]\nName=org.example.A\nExec=/bin/true\n",
                None,
                "Name",
            ),
            ("Name=org.example.A\n[D-BUS Service]\n", Some(1), "section"),
            (
                "[D-BUS Service]\nName=org.example.A\nExec=/bin/a\\qb\n",
                Some(3),
                "escape",
            ),
            (
                "[D-BUS Service]\nName=org.example.A\nExec=/bin/a \"b\n",
                Some(3),
                "unclosed",
            ),
            (
                "[D-BUS Service]\nName=org.example.A\nExec=\n",
                Some(3),
                "program",
            ),
            (
                "[D-BUS Service]\nName=org.example.A\nExec=''\n",
                Some(3),
                "program",
            ),
            (
                "[D-BUS Service]\nName=:1.5\nExec=/bin/true\n",
                Some(2),
                "bus name",
            ),
            (
                "[D-BUS Service\nName=org.example.A\n",
                Some(1),
                "section header",
            ),
            ("[D-BUS Service]\n Name=org.example.A\n", Some(2), "key"),
            ("[D-BUS Service]\nName\n", Some(2), "'='"),
            ("[D-BUS Service]\nName: x\n", Some(2), "key name"),
        ];
        for (text, line, needle) in cases {
            let w = warning("e.service", text);
            assert_eq!(w.line, line, "{text:?}: {w}");
            assert!(w.message.contains(needle), "{text:?}: {w}");
        }
    }

    #[test]
    fn exec_is_unescaped_before_it_is_split() {
        let exec = |value: &str| {
            let text = format!("[D-BUS Service]\nName=org.example.A\nExec={value}\n");
            load_one("x.service", &text).1.expect("loads").exec
        };
        assert_eq!(exec(r"/bin/a\sb c"), ["/bin/a", "b", "c"]);
        assert_eq!(exec(r#"/bin/a "x\sy""#), ["/bin/a", "x y"]);
        // `\\` becomes one backslash, which then escapes for the shell.
        assert_eq!(exec(r"/bin/a x\\sy"), ["/bin/a", "xsy"]);
        assert_eq!(exec(r#"/bin/a "p\\\\q""#), ["/bin/a", r"p\q"]);
        // `\n` is a newline, which separates words.
        assert_eq!(exec(r"/bin/a\nb"), ["/bin/a", "b"]);
        assert_eq!(exec(r"/bin/a\tb"), ["/bin/a", "b"]);
    }

    fn split(command: &str) -> Vec<String> {
        split_exec(command).unwrap_or_else(|err| panic!("{command:?}: {err}"))
    }

    #[test]
    fn exec_splitting_matches_dbus_shell_test_cases() {
        // The command lines of dbus's test/shell-test.c.
        assert_eq!(
            split(r#"command -s --force-shutdown "a string" 123"#),
            ["command", "-s", "--force-shutdown", "a string", "123"]
        );
        assert_eq!(split("command -s"), ["command", "-s"]);
        assert_eq!(
            split("/opt/gnome/bin/service-start"),
            ["/opt/gnome/bin/service-start"]
        );
        assert_eq!(
            split("grep -l -r -i 'whatever' files*.c"),
            ["grep", "-l", "-r", "-i", "whatever", "files*.c"]
        );
        assert_eq!(split("ls -l -a --colors"), ["ls", "-l", "-a", "--colors"]);
        assert_eq!(
            split("evolution mailto:pepe@cuco.com"),
            ["evolution", "mailto:pepe@cuco.com"]
        );
        assert_eq!(split("run \"a \n multiline\""), ["run", "a \n multiline"]);
        assert!(split_exec("ls \"a wrong string'").is_err());
    }

    #[test]
    fn exec_splitting_quoting_rules() {
        // Single quotes are literal, even for backslashes.
        assert_eq!(split(r"a 'b\c $d'"), ["a", r"b\c $d"]);
        assert_eq!(split(r"a 'foo'\''bar'"), ["a", "foo'bar"]);
        // Double quotes escape only $ ` " \ and newline.
        assert_eq!(
            split(r#"a "\$x \`y\` \"q\" \\ \n""#),
            ["a", r#"$x `y` "q" \ \n"#]
        );
        // Outside quotes a backslash escapes anything; backslash-newline vanishes.
        assert_eq!(split(r"a b\ c\'d"), ["a", "b c'd"]);
        assert_eq!(split("a b\\\nc"), ["a", "bc"]);
        // Quoted pieces join the surrounding word; '' is an empty argument.
        assert_eq!(split(r#"a x"y z"'w' ''"#), ["a", "xy zw", ""]);
        // Nothing is expanded; tabs and newlines separate words.
        assert_eq!(
            split("a $HOME ~ *\tb\nc"),
            ["a", "$HOME", "~", "*", "b", "c"]
        );
        // Blanks at either end make no empty arguments.
        assert_eq!(split("  a  b  "), ["a", "b"]);
    }

    #[test]
    fn exec_splitting_comments_and_errors() {
        assert_eq!(split("a b # c d"), ["a", "b"]);
        // The reference starts a comment at any unquoted '#'...
        assert_eq!(split("a b#c d"), ["a", "b"]);
        assert_eq!(split("a '#' \"#\" \\#"), ["a", "#", "#", "#"]);
        // ...and a comment swallows its newline without ending the word.
        assert_eq!(split("a b#c\nd e"), ["a", "bd", "e"]);
        // A '#' as the very last character counts as an unclosed quote there.
        assert!(split_exec("a #").is_err());
        assert!(split_exec(r"a b\").is_err());
        assert!(split_exec(r#"a "b\""#).is_err());
        assert!(split_exec("a 'b").is_err());
        assert!(split_exec("   ").is_err());
    }

    #[test]
    fn first_definition_wins_across_and_within_directories() {
        let first = TempDir::new().expect("tempdir");
        let second = TempDir::new().expect("tempdir");
        write(
            first.path(),
            "b.service",
            "[D-BUS Service]\nName=org.example.Same\nExec=/bin/b\n",
        );
        write(
            first.path(),
            "a.toml",
            "name = \"org.example.Same\"\nexec = [\"/bin/a\"]\n",
        );
        write(
            second.path(),
            "0.toml",
            "name = \"org.example.Same\"\nexec = [\"/bin/zero\"]\n",
        );
        write(
            second.path(),
            "1.toml",
            "name = \"org.example.Other\"\nexec = [\"/bin/other\"]\n",
        );
        let loaded = load(&[first.path().to_owned(), second.path().to_owned()]);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let names: Vec<_> = loaded.services.keys().cloned().collect();
        assert_eq!(names, ["org.example.Other", "org.example.Same"]);
        assert_eq!(loaded.services["org.example.Same"].exec, ["/bin/a"]);
        assert_eq!(
            loaded.services["org.example.Same"].source,
            first.path().join("a.toml")
        );
    }

    #[test]
    fn broken_file_is_skipped_while_others_load() {
        let dir = TempDir::new().expect("tempdir");
        write(
            dir.path(),
            "good.toml",
            "name = \"org.example.Good\"\nexec = [\"/bin/true\"]\n",
        );
        let bad = write(
            dir.path(),
            "bad.toml",
            "name = \"org.example.Bad\"\nexec = /bin/true\n",
        );
        write(dir.path(), "ignored.txt", "not an activation file");
        fs::create_dir(dir.path().join("sub.service")).expect("mkdir");
        fs::write(
            dir.path().join("latin1.service"),
            b"[D-BUS Service]\nName=caf\xe9\n",
        )
        .expect("write");
        let missing = dir.path().join("does-not-exist");

        let loaded = load(&[missing, dir.path().to_owned()]);
        assert_eq!(
            loaded.services.keys().collect::<Vec<_>>(),
            ["org.example.Good"]
        );
        assert_eq!(loaded.warnings.len(), 2, "{:?}", loaded.warnings);
        let toml_warning = loaded
            .warnings
            .iter()
            .find(|w| w.path == bad)
            .expect("warning for bad.toml");
        assert_eq!(toml_warning.line, Some(2));
        assert!(
            toml_warning
                .to_string()
                .starts_with(&format!("{}:2: ", bad.display()))
        );
        let utf8_warning = loaded
            .warnings
            .iter()
            .find(|w| w.path.ends_with("latin1.service"))
            .expect("warning for latin1.service");
        assert_eq!(
            utf8_warning.to_string(),
            format!("{}: invalid UTF-8", utf8_warning.path.display())
        );
    }

    #[test]
    fn oversized_file_is_refused() {
        let text = format!(
            "name = \"org.example.Big\"\nexec = [\"/bin/true\"]\n#{}\n",
            "x".repeat(130 * 1024)
        );
        assert!(warning("big.toml", &text).message.contains("larger"));
    }

    /// `session_dirs` over a fixed environment, as strings.
    fn dirs_for(vars: &[(&str, &str)]) -> Vec<String> {
        let env = |key: &str| {
            vars.iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.to_string())
        };
        session_dirs(env)
            .iter()
            .map(|dir| dir.display().to_string())
            .collect()
    }

    #[test]
    fn session_dirs_follow_the_reference_order() {
        let dirs = dirs_for(&[
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
            ("XDG_DATA_HOME", "/home/u/data"),
            ("XDG_DATA_DIRS", "/opt/share::relative/share:/usr/share"),
            ("HOME", "/home/u"),
        ]);
        assert_eq!(
            dirs,
            [
                "/run/user/1000/dbus-1/services",
                "/home/u/data/dbus-1/services",
                "/opt/share/dbus-1/services",
                "/usr/share/dbus-1/services",
            ]
        );
        let dirs = dirs_for(&[("HOME", "/home/u"), ("XDG_DATA_HOME", "")]);
        assert_eq!(
            dirs,
            [
                "/home/u/.local/share/dbus-1/services",
                "/usr/local/share/dbus-1/services",
                "/usr/share/dbus-1/services",
            ]
        );
    }
}

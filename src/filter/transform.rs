//! `transform`: a destination's JavaScript in RudderStack's form, `transformEvent(event,
//! metadata)`, run in the process by QuickJS (through `rquickjs`).
//!
//! Each destination's script gets its own thread, runtime and context: scripts share nothing,
//! and a slow one holds up only its own destination. The runtime has a memory cap, a stack cap
//! and an interrupt handler that ends any call running past `transform_timeout`; it has no
//! module loader and no host functions, so a script reaches no network, file or clock setting.
//! Dropping the [`Transform`] (a reload replaced it) ends the thread.

use std::cell::Cell;
use std::path::Path;
use std::rc::Rc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rquickjs::{CatchResultExt, CaughtError, Context, Ctx, Function, Module, Persistent, Runtime};
use serde_json::Value;

/// The memory one destination's script may hold; past it, the call fails (and only it).
pub const MEMORY_LIMIT: usize = 64 * 1024 * 1024;
const STACK_LIMIT: usize = 512 * 1024;
/// The thread's own stack: roomy next to [`STACK_LIMIT`], so QuickJS's check trips first.
const THREAD_STACK: usize = 4 * 1024 * 1024;
/// Events waiting for one destination's script at most, before callers wait to hand theirs.
const QUEUE: usize = 64;

/// What a script made of one event: the events to deliver (none: dropped), or why it failed.
pub type Transformed = Result<Vec<Value>, String>;

/// One event and its metadata (`{sourceName, destinationName, destinationKind, messageId}`),
/// as JSON.
pub struct Input {
    pub event: String,
    pub metadata: Value,
}

struct Job {
    inputs: Vec<Input>,
    reply: tokio::sync::oneshot::Sender<Vec<Transformed>>,
}

/// A compiled script, ready to run.
pub struct Transform {
    /// The script's file, as the config names it.
    pub file: String,
    jobs: mpsc::SyncSender<Job>,
    timeout: Duration,
}

impl std::fmt::Debug for Transform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transform")
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Transform {
    /// Loads `source` (named `file` in errors) on its own thread; an error says why it does not
    /// compile or does not define `transformEvent`.
    pub fn compile(file: &Path, source: String, timeout: Duration) -> Result<Transform, String> {
        let (jobs, queue) = mpsc::sync_channel::<Job>(QUEUE);
        let (ready, compiled) = mpsc::channel();
        let name = file.display().to_string();
        std::thread::Builder::new()
            .name("transform".into())
            .stack_size(THREAD_STACK)
            .spawn(move || match Engine::new(&name, &source, timeout) {
                Ok(engine) => {
                    let _ = ready.send(Ok(()));
                    while let Ok(job) = queue.recv() {
                        let results = job.inputs.iter().map(|input| engine.run(input)).collect();
                        let _ = job.reply.send(results);
                    }
                }
                Err(message) => {
                    let _ = ready.send(Err(message));
                }
            })
            .map_err(|e| format!("cannot start a thread for the transform: {e}"))?;
        let compile_limit = timeout.max(Duration::from_secs(1)) + Duration::from_secs(5);
        match compiled.recv_timeout(compile_limit) {
            Ok(Ok(())) => Ok(Transform {
                file: file.display().to_string(),
                jobs,
                timeout,
            }),
            Ok(Err(message)) => Err(message),
            Err(_) => Err("the script did not load in time".into()),
        }
    }

    /// Runs the script on each input, in order.
    pub async fn run(&self, inputs: Vec<Input>) -> Vec<Transformed> {
        let count = inputs.len();
        let failed = |message: &str| vec![Err(message.to_owned()); count];
        let (reply, answer) = tokio::sync::oneshot::channel();
        let jobs = self.jobs.clone();
        // The queue is bounded: handing a job over may wait, so it waits off the runtime.
        let handed = tokio::task::spawn_blocking(move || jobs.send(Job { inputs, reply })).await;
        if !matches!(handed, Ok(Ok(()))) {
            return failed("the transform is not running");
        }
        // The interrupt handler ends each call in time; this guards against a thread stuck
        // somewhere it cannot reach.
        let limit = self.timeout * (count as u32 + 1) + Duration::from_secs(5);
        match tokio::time::timeout(limit, answer).await {
            Ok(Ok(results)) => results,
            _ => failed("the transform did not answer in time"),
        }
    }
}

/// The runtime of one destination's script, living on its thread.
struct Engine {
    // Field order: the function and context go before the runtime that owns them.
    call: Persistent<Function<'static>>,
    context: Context,
    runtime: Runtime,
    deadline: Rc<Cell<Option<Instant>>>,
    timeout: Duration,
}

/// Wraps the script's function so that `metadata` is a function, as RudderStack passes it.
const WRAPPER: &str = "(function (transform) {\n\
    return function (event, metadata) {\n\
        return transform(event, function () { return metadata; });\n\
    };\n\
})";

impl Engine {
    fn new(name: &str, source: &str, timeout: Duration) -> Result<Engine, String> {
        let runtime = Runtime::new().map_err(|e| format!("cannot start QuickJS: {e}"))?;
        runtime.set_memory_limit(MEMORY_LIMIT);
        runtime.set_max_stack_size(STACK_LIMIT);
        let deadline: Rc<Cell<Option<Instant>>> = Rc::default();
        let watch = deadline.clone();
        runtime.set_interrupt_handler(Some(Box::new(move || {
            watch.get().is_some_and(|at| Instant::now() >= at)
        })));
        let context = Context::full(&runtime).map_err(|e| format!("cannot start QuickJS: {e}"))?;
        deadline.set(Some(Instant::now() + timeout.max(Duration::from_secs(1))));
        let call = context.with(|ctx| -> Result<_, String> {
            let function = load(&ctx, name, source)?;
            let wrapper: Function = ctx.eval(WRAPPER).catch(&ctx).map_err(|e| describe(&e))?;
            let wrapped: Function = wrapper
                .call((function,))
                .catch(&ctx)
                .map_err(|e| describe(&e))?;
            Ok(Persistent::save(&ctx, wrapped))
        });
        deadline.set(None);
        let call = call.map_err(|message| format!("{name}: {message}"))?;
        Ok(Engine {
            call,
            context,
            runtime,
            deadline,
            timeout,
        })
    }

    fn run(&self, input: &Input) -> Transformed {
        self.deadline.set(Some(Instant::now() + self.timeout));
        let result = self.context.with(|ctx| {
            let call = self.call.clone().restore(&ctx).map_err(|e| e.to_string())?;
            let event = ctx
                .json_parse(input.event.as_bytes())
                .catch(&ctx)
                .map_err(|e| describe(&e))?;
            let metadata = ctx
                .json_parse(input.metadata.to_string())
                .catch(&ctx)
                .map_err(|e| describe(&e))?;
            let output: rquickjs::Value = call
                .call((event, metadata))
                .catch(&ctx)
                .map_err(|e| describe(&e))?;
            if output.is_null() || output.is_undefined() {
                return Ok(Vec::new());
            }
            let text = ctx
                .json_stringify(output)
                .catch(&ctx)
                .map_err(|e| describe(&e))?
                .map(|s| s.to_string())
                .transpose()
                .map_err(|e| e.to_string())?
                .unwrap_or_default();
            events_of(&text)
        });
        let overran = self.deadline.take().is_some_and(|at| Instant::now() >= at);
        // What a failed call left behind (a huge array, say) is not kept for the next one.
        if result.is_err() {
            self.runtime.run_gc();
        }
        result.map_err(|message| {
            if overran {
                format!(
                    "transformEvent ran past transform_timeout ({}): {message}",
                    humantime::format_duration(self.timeout)
                )
            } else {
                message
            }
        })
    }
}

/// Evaluates the script (as a module when it has `export`s) and finds `transformEvent`.
fn load<'js>(ctx: &Ctx<'js>, name: &str, source: &str) -> Result<Function<'js>, String> {
    let is_module = source
        .lines()
        .any(|line| line.trim_start().starts_with("export "));
    let found: rquickjs::Value = if is_module {
        let module = Module::declare(ctx.clone(), name, source)
            .catch(ctx)
            .map_err(|e| describe(&e))?;
        let (module, promise) = module.eval().catch(ctx).map_err(|e| describe(&e))?;
        promise
            .finish::<()>()
            .catch(ctx)
            .map_err(|e| describe(&e))?;
        let namespace = module.namespace().catch(ctx).map_err(|e| describe(&e))?;
        namespace
            .get("transformEvent")
            .catch(ctx)
            .map_err(|e| describe(&e))?
    } else {
        let mut options = rquickjs::context::EvalOptions::default();
        options.filename = Some(name.to_owned());
        ctx.eval_with_options::<(), _>(source, options)
            .catch(ctx)
            .map_err(|e| describe(&e))?;
        ctx.globals()
            .get("transformEvent")
            .catch(ctx)
            .map_err(|e| describe(&e))?
    };
    found.into_function().ok_or_else(|| {
        "the script does not define `transformEvent` (write `export function transformEvent(event, metadata) { ... }`)"
            .to_owned()
    })
}

/// A script's return value as events: one object, or an array of them (`null`s skipped).
fn events_of(text: &str) -> Transformed {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| format!("transformEvent returned what is not JSON: {e}"))?;
    let items = match value {
        Value::Array(items) => items,
        other => vec![other],
    };
    items
        .into_iter()
        .filter(|item| !item.is_null())
        .map(|item| match item {
            Value::Object(_) => Ok(item),
            other => Err(format!(
                "transformEvent must return an event, null or an array of events, not {other}"
            )),
        })
        .collect()
}

/// An exception as one line: its message (and where, when the engine says).
fn describe(error: &CaughtError) -> String {
    match error {
        CaughtError::Exception(exception) => {
            let message = exception.message().unwrap_or_default();
            let name = exception
                .get::<_, Option<String>>("name")
                .ok()
                .flatten()
                .unwrap_or_else(|| "Error".into());
            let at = exception
                .stack()
                .and_then(|stack| stack.lines().next().map(|line| line.trim().to_owned()))
                .filter(|line| !line.is_empty())
                .map(|line| format!(" ({line})"))
                .unwrap_or_default();
            format!("{name}: {message}{at}")
        }
        CaughtError::Value(value) => match value.as_string().and_then(|s| s.to_string().ok()) {
            Some(text) => format!("thrown: {text}"),
            None => format!("thrown: a {}", value.type_name()),
        },
        CaughtError::Error(error) => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn compile(source: &str) -> Result<Transform, String> {
        Transform::compile(
            Path::new("t.js"),
            source.to_owned(),
            Duration::from_millis(50),
        )
    }

    fn input(event: Value) -> Input {
        Input {
            event: event.to_string(),
            metadata: json!({"destinationName": "d", "messageId": "m1"}),
        }
    }

    async fn one(transform: &Transform, event: Value) -> Transformed {
        transform.run(vec![input(event)]).await.remove(0)
    }

    #[tokio::test]
    async fn returns_the_event_null_or_an_array() {
        let transform = compile(
            "export function transformEvent(event, metadata) {\n\
               if (event.event === 'drop') return null;\n\
               if (event.event === 'split') return [event, {...event, event: 'copy'}, null];\n\
               event.properties = {...event.properties, by: metadata().destinationName,\n\
                                   id: metadata(event).messageId};\n\
               return event;\n\
             }",
        )
        .unwrap();
        let changed = one(&transform, json!({"event": "a", "properties": {"x": 1}})).await;
        assert_eq!(
            changed,
            Ok(vec![
                json!({"event": "a", "properties": {"x": 1, "by": "d", "id": "m1"}})
            ])
        );
        assert_eq!(one(&transform, json!({"event": "drop"})).await, Ok(vec![]));
        let split = one(&transform, json!({"event": "split"})).await.unwrap();
        assert_eq!(split.len(), 2);
        assert_eq!(split[1]["event"], "copy");
    }

    #[tokio::test]
    async fn a_plain_script_defines_it_globally() {
        let transform =
            compile("function transformEvent(e) { e.userId = 'u2'; return e; }").unwrap();
        let out = one(&transform, json!({"userId": "u1"})).await.unwrap();
        assert_eq!(out, vec![json!({"userId": "u2"})]);
    }

    #[test]
    fn bad_scripts_fail_to_compile_with_a_reason() {
        let error = compile("export function transformEvent(e) { return e; ").unwrap_err();
        assert!(error.starts_with("t.js: SyntaxError"), "{error}");
        let error = compile("function somethingElse() {}").unwrap_err();
        assert!(
            error.contains("does not define `transformEvent`"),
            "{error}"
        );
        let error = compile("while (true) {}").unwrap_err();
        assert!(error.contains("interrupted"), "{error}");
        let error =
            compile("import fs from 'fs';\nexport function transformEvent(e) { return e; }")
                .unwrap_err();
        assert!(error.contains("t.js"), "{error}");
    }

    #[tokio::test]
    async fn hostile_scripts_fail_alone_and_the_engine_goes_on() {
        let transform = compile(
            "export function transformEvent(event) {\n\
               if (event.event === 'loop') { while (true) {} }\n\
               if (event.event === 'catch-loop') { try { while (true) {} } catch (e) {} return event; }\n\
               if (event.event === 'big') { const a = []; while (true) a.push('x'.repeat(1024 * 1024)); }\n\
               if (event.event === 'huge') { return 'y'.repeat(100 * 1024 * 1024); }\n\
               if (event.event === 'throw') throw new Error('no thanks');\n\
               if (event.event === 'throw-string') throw 'plain';\n\
               if (event.event === 'deep') { const f = (n) => f(n + 1) + 1; f(0); }\n\
               if (event.event === 'number') return 5;\n\
               return event;\n\
             }",
        )
        .unwrap();
        let started = Instant::now();
        let looped = one(&transform, json!({"event": "loop"})).await.unwrap_err();
        assert!(
            looped.contains("ran past transform_timeout (50ms)"),
            "{looped}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        let caught = one(&transform, json!({"event": "catch-loop"}))
            .await
            .unwrap_err();
        assert!(
            caught.contains("transform_timeout"),
            "cannot be caught: {caught}"
        );
        for event in ["big", "huge"] {
            let error = one(&transform, json!({ "event": event }))
                .await
                .unwrap_err();
            assert!(error.contains("out of memory"), "{event}: {error}");
        }
        let thrown = one(&transform, json!({"event": "throw"}))
            .await
            .unwrap_err();
        assert!(thrown.starts_with("Error: no thanks"), "{thrown}");
        let thrown = one(&transform, json!({"event": "throw-string"}))
            .await
            .unwrap_err();
        assert_eq!(thrown, "thrown: plain");
        let deep = one(&transform, json!({"event": "deep"})).await.unwrap_err();
        assert!(deep.contains("Maximum call stack size exceeded"), "{deep}");
        let number = one(&transform, json!({"event": "number"}))
            .await
            .unwrap_err();
        assert!(number.contains("not 5"), "{number}");
        // After all that, the same engine still works.
        assert_eq!(
            one(&transform, json!({"event": "fine"})).await,
            Ok(vec![json!({"event": "fine"})])
        );
    }

    #[tokio::test]
    async fn scripts_reach_nothing_outside() {
        let transform = compile(
            "export function transformEvent(event) {\n\
               event.properties = {\n\
                 fetch: typeof fetch, require: typeof require, std: typeof std, os: typeof os,\n\
                 process: typeof process, xhr: typeof XMLHttpRequest,\n\
               };\n\
               return event;\n\
             }",
        )
        .unwrap();
        let out = one(&transform, json!({})).await.unwrap();
        for (name, kind) in out[0]["properties"].as_object().unwrap() {
            assert_eq!(kind, "undefined", "{name} is reachable");
        }
    }
}

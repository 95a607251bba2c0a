//! `mimscope run RECIPE.toml`: a chain of commands written as TOML tables.
//!
//! Each `[[step]]` names a `command` and gives that command's flags as keys (underscores or
//! hyphens), so a recipe is read by the very code that reads the command line: every step is
//! turned into the argument list `mimscope <command> --key value ...` and parsed by clap.
//! Values: strings, numbers, `true` (a bare flag; `false` leaves it out), and arrays (the flag
//! repeated). The key `paths` gives positional arguments (`fusion`'s run folders or
//! checkpoints). Relative paths are relative to the folder `mimscope run` is started in.
//! Train steps whose run folder is complete are skipped, unfinished ones resumed.

use std::path::Path;

use crate::cli::Command;
use anyhow::{bail, Context, Result};

/// The argument lists of every step of a recipe, in order.
pub fn parse_recipe(text: &str) -> Result<Vec<Vec<String>>> {
    let doc: toml::Table = toml::from_str(text).context("not valid TOML")?;
    for key in doc.keys() {
        if key != "step" && key != "description" {
            bail!("unknown top-level key `{key}`: a recipe has `description` and [[step]] tables");
        }
    }
    let steps = match doc.get("step") {
        Some(toml::Value::Array(a)) if !a.is_empty() => a,
        _ => bail!("no [[step]] tables: each step names a `command` and its flags"),
    };
    steps
        .iter()
        .enumerate()
        .map(|(i, step)| step_args(step).with_context(|| format!("step {}", i + 1)))
        .collect()
}

fn scalar(v: &toml::Value) -> Result<String> {
    Ok(match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        other => bail!("value {other} is not a string or a number"),
    })
}

fn step_args(step: &toml::Value) -> Result<Vec<String>> {
    let table = step.as_table().context("a step must be a table")?;
    let command = table
        .get("command")
        .and_then(|c| c.as_str())
        .context("missing `command = \"...\"` (train, spectrum, fusion, hessian, ...)")?;
    let mut args = vec!["mimscope".to_string(), command.to_string()];
    let mut positional = Vec::new();
    for (key, value) in table {
        if key == "command" {
            continue;
        }
        if key == "paths" {
            match value {
                toml::Value::Array(a) => {
                    for v in a {
                        positional.push(scalar(v)?);
                    }
                }
                v => positional.push(scalar(v)?),
            }
            continue;
        }
        let flag = format!("--{}", key.replace('_', "-"));
        match value {
            toml::Value::Boolean(true) => args.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(a) => {
                for v in a {
                    args.push(flag.clone());
                    args.push(scalar(v).with_context(|| format!("key `{key}`"))?);
                }
            }
            v => {
                args.push(flag);
                args.push(scalar(v).with_context(|| format!("key `{key}`"))?);
            }
        }
    }
    args.extend(positional);
    Ok(args)
}

/// Parses and runs every step of the recipe at `path`.
pub fn run(path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading recipe {} (does the file exist?)", path.display()))?;
    let steps = parse_recipe(&text).with_context(|| format!("in recipe {}", path.display()))?;
    // Parse every step before running any, so a typo in the last step fails in a second.
    let commands = steps
        .iter()
        .enumerate()
        .map(|(i, args)| {
            super::parse_command_line(args).with_context(|| {
                format!(
                    "in recipe {} step {}: `{}`",
                    path.display(),
                    i + 1,
                    args.join(" ")
                )
            })
        })
        .collect::<Result<Vec<Command>>>()?;
    for (i, (command, args)) in commands.into_iter().zip(&steps).enumerate() {
        crate::note!("== step {}/{}: {}", i + 1, steps.len(), args[1..].join(" "));
        match command {
            Command::Train(t) => super::train_or_continue(&t),
            other => super::execute(other),
        }
        .with_context(|| format!("recipe {} step {}", path.display(), i + 1))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::Parser;

    #[test]
    fn steps_become_command_lines() {
        let text = r#"
            description = "x"
            [[step]]
            command = "spectrum"
            checkpoint = ["a.safetensors", "b.safetensors"]
            images = 8
            sublayers = true
            batch_size = 4
            out = "s"
            [[step]]
            command = "fusion"
            paths = ["runs/mff"]
            out = "o"
        "#;
        let steps = parse_recipe(text).unwrap();
        assert_eq!(
            steps[0].join(" "),
            "mimscope spectrum --batch-size 4 --checkpoint a.safetensors --checkpoint \
             b.safetensors --images 8 --out s --sublayers"
        );
        assert_eq!(steps[1].join(" "), "mimscope fusion --out o runs/mff");
        let cli = Cli::try_parse_from(&steps[0]).unwrap();
        assert!(matches!(cli.command, Command::Spectrum(ref s) if s.images == 8 && s.sublayers));
    }

    #[test]
    fn bad_recipes_say_what_is_wrong() {
        let e = parse_recipe("[[step]]\nimages = 3\n").unwrap_err();
        assert!(format!("{e:#}").contains("command"), "{e:#}");
        let e = parse_recipe("foo = 1\n").unwrap_err();
        assert!(
            format!("{e:#}").contains("unknown top-level key `foo`"),
            "{e:#}"
        );
        let e = parse_recipe("description = \"only\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("[[step]]"), "{e:#}");
    }
}

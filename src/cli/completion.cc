// SPDX-License-Identifier: Apache-2.0
// Shell completion generated from the CLI11 command tree, so it never drifts from the real flags.
#include <fmt/format.h>

#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "cli/commands.h"
#include "common/strings.h"

namespace matchlock::cli {
namespace {

std::vector<std::string> optionWords(const CLI::App& app) {
  std::vector<std::string> words;
  for (const CLI::Option* opt : app.get_options()) {
    if (!opt->nonpositional()) {
      continue;
    }
    for (const std::string& s : opt->get_snames()) {
      words.push_back("-" + s);
    }
    for (const std::string& l : opt->get_lnames()) {
      words.push_back("--" + l);
    }
  }
  return words;
}

}  // namespace

std::string completionScript(const CLI::App& app, const std::string& shell) {
  std::string cases;
  std::vector<std::string> top = optionWords(app);
  for (const CLI::App* sub : app.get_subcommands([](const CLI::App*) { return true; })) {
    top.push_back(sub->get_name());
    cases += fmt::format("    {}) opts=\"{}\" ;;\n", sub->get_name(), join(optionWords(*sub), " "));
  }
  std::string script = fmt::format(R"(# matchlock completion ({shell})
_matchlock() {{
  local cur prev cmd="" opts w i
  cur="${{COMP_WORDS[COMP_CWORD]}}"
  prev="${{COMP_WORDS[COMP_CWORD-1]}}"
  for ((i = 1; i < COMP_CWORD; i++)); do
    w="${{COMP_WORDS[i]}}"
    case "$w" in -*) ;; *) cmd="$w"; break ;; esac
  done
  case "$prev" in
    -f|--file) COMPREPLY=($(compgen -f -- "$cur")); return ;;
    -o|--output) COMPREPLY=($(compgen -W "human json yaml" -- "$cur")); return ;;
  esac
  case "$cmd" in
{cases}    *) opts="{top}" ;;
  esac
  COMPREPLY=($(compgen -W "$opts" -- "$cur"))
}}
complete -o default -F _matchlock matchlock
)",
                                   fmt::arg("shell", shell), fmt::arg("cases", cases),
                                   fmt::arg("top", join(top, " ")));
  if (shell == "zsh") {
    return "autoload -U +X bashcompinit && bashcompinit\n" + script;
  }
  return script;
}

}  // namespace matchlock::cli

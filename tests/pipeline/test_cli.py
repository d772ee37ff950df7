"""The CLI: one parser whose options come from the verb functions' typed signatures."""

import pytest

from pipeline import cli


def test_every_verb_builds_its_options_from_its_signature():
    parser = cli.build_parser()
    args = parser.parse_args(["merge", "--zoo", '{"seed": 1}', "--method", "regmean", "--pretrained", "p",
                              "--out", "o", "--tasks", "a", "b", "--budget-mib", "16"])
    assert args.zoo == {"seed": 1} and args.tasks == ["a", "b"] and args.budget_mib == 16.0
    assert args.task_vectors == [] and args.settings == {} and args._fn is cli.command("merge")
    args = parser.parse_args(["analysis-sensitivity", "--search", "s", "--out", "o", "--figure", "f",
                              "--test-curves", "a", "b"])
    assert args.test_curves == ["a", "b"] and args.references == []
    args = parser.parse_args(["analysis-surrogate", "--zoo", "{}", "--pretrained", "p", "--task-vectors", "t",
                              "--heads", "h", "--lambdas", "0.1", "0.3", "--out", "o", "--figure", "f",
                              "--spearman-out", "s"])
    assert args.lambdas == [0.1, 0.3]


def test_required_options_and_unknown_verbs_are_refused(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser(["merge"]).parse_args(["merge", "--zoo", "{}"])
    assert "--method" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown verb 'merj'"):
        cli.command_module("merj")


def test_each_verb_has_a_function_with_a_docstring():
    for verb in cli.COMMANDS:
        fn = cli.command(verb)
        assert fn.__doc__, verb

"""The pt-PT/pt-BR marker lexicon shared by the evaluation step and shadow traffic: pure, no server."""

from __future__ import annotations

import pytest

from amalia_variety import count_markers


@pytest.mark.parametrize(
    ("text", "pt_pt", "pt_br"),
    [
        ("Apanhei o autocarro e depois o comboio.", 2, 0),
        ("Peguei o ônibus e depois o trem.", 0, 2),
        ("Peguei o onibus.", 0, 1),  # a dropped accent is still pt-BR
        ("O que é que estás a fazer?", 1, 0),
        ("O que você está fazendo?", 0, 1),
        ("Tomei o pequeno-almoço. O ecrã do telemóvel partiu-se.", 3, 0),
        ("Tomei café da manhã. A tela do celular quebrou.", 0, 3),
        ("Onde fica a casa de banho? Põe no frigorífico.", 2, 0),
        ("Onde fica o banheiro? Põe na geladeira.", 0, 2),
        ("Contacte a nossa equipa.", 2, 0),
        ("Entre em contato com a equipe.", 0, 2),
        ("Atravesse na passadeira.", 1, 0),
        ("Atravesse na faixa de pedestres.", 0, 1),
        ("De facto, é um facto.", 2, 0),
        ("De fato, é fato que ele veio.", 0, 2),
    ],
)
def test_count_markers_counts_each_variety_when_markers_present(
    text: str, pt_pt: int, pt_br: int
) -> None:
    counts = count_markers(text)
    assert (counts.pt_pt, counts.pt_br) == (pt_pt, pt_br)


@pytest.mark.parametrize(
    "text",
    [
        "Vestiu o fato e a gravata para o casamento.",  # fato = suit
        "Ele vinha de fato e gravata.",
        "Comprei um fato de banho novo.",
        "O fato de treino está na mala.",
        "O trem de aterragem do avião desceu.",  # trem = landing gear
        "Arrumei o trem de cozinha.",
        "A tela foi pintada a óleo.",  # tela = canvas
        "A membrana celular protege a célula.",  # celular = adjective
        "A moça da loja foi simpática.",  # moça is pt-PT too
        "O dia está lindo e o jantar estava quando cheguei.",  # not gerunds
    ],
)
def test_count_markers_finds_no_pt_br_when_form_is_european_in_that_sense(text: str) -> None:
    assert count_markers(text).pt_br == 0


def test_variety_score_is_share_of_pt_pt_markers_and_none_when_there_are_none() -> None:
    assert count_markers("O autocarro e o ônibus.").score == 0.5
    assert count_markers("O comboio.").score == 1.0
    assert count_markers("Bom dia.").score is None
    mixed = count_markers("O autocarro, o ônibus e o trem.")
    assert (mixed.pt_pt_concepts, mixed.pt_br_concepts) == (("bus",), ("bus", "train"))

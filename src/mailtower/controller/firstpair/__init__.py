"""``mailtower init``: an operator's first real pair, from answers to files.

    answers.from_data({...})           InitAnswers, every field checked (InitError names each)
    write.run(answers, inventory_dir)  both towers' inventories, the GOC's, the pair file, and
                                       outside the repository the secrets (0600 in 0700
                                       directories), the GOC's bundle keys and the DNS key
    lab.lab_answers()                  the answers that describe the twin lab (for CI)

See docs/first-real-pair.md.
"""
